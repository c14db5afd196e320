//! Charts that render differently at every rendering (pure).
//!
//! `helm install` keeps a generated value by `lookup`ing the live object first; `helm template`,
//! which kas runs, has no cluster, so `lookup` finds nothing and a chart's "generate a password
//! once" (`randAlphaNum`, `genCA`, `uuidv4`…) generates a new one at every rendering: every new
//! commit, every rendering cache miss, every kas restart. Applied, that rotates a live Secret (or
//! a webhook's CA bundle) under the Pods using it. kas renders such a chart twice and compares:
//! the documents that differ are exactly the objects affected, and the chart's files calling
//! these functions say why.

use std::collections::BTreeMap;

/// Sprig's and Helm's functions whose result differs from one rendering to the next: random
/// generators, keys and certificates (random keys and serials), salted hashes (`bcrypt`,
/// `htpasswd`), random IVs (`encryptAES`), shuffling, and the clock. `derivePassword` is
/// deterministic and left out; `lookup` is not random but finds nothing without a cluster,
/// so it is named with them (a chart falls back to generating when it finds nothing).
pub const UNSTABLE_FUNCTIONS: &[&str] = &[
    "randAlphaNum",
    "randAlpha",
    "randNumeric",
    "randAscii",
    "randBytes",
    "randInt",
    "uuidv4",
    "shuffle",
    "genPrivateKey",
    "genCA",
    "genCAWithKey",
    "genSelfSignedCert",
    "genSelfSignedCertWithKey",
    "genSignedCert",
    "genSignedCertWithKey",
    "bcrypt",
    "htpasswd",
    "encryptAES",
    "now",
    "unixEpoch",
    "lookup",
];

/// The functions of [`UNSTABLE_FUNCTIONS`] that `text` names, as whole words, in list order.
/// Words in template comments (`{{/* now */}}`) do not count: they made every cache miss of
/// such a chart render it twice. Other words count wherever they are (a YAML comment, a
/// string): this only names candidates, the comparison of two renderings decides.
pub fn functions_in(text: &str) -> Vec<&'static str> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let text = without_template_comments(text);
    let words: std::collections::BTreeSet<&str> = text
        .split(|c: char| !is_word(c))
        .filter(|w| !w.is_empty())
        .collect();
    UNSTABLE_FUNCTIONS
        .iter()
        .copied()
        .filter(|f| words.contains(f))
        .collect()
}

/// `text` without its Go template comments (`{{/* … */}}`, `{{- /* … */ -}}`), as Go's lexer
/// reads them. Anything else is kept, erring towards words that call nothing: an action's
/// quoted strings are skipped over when looking for its end (a `{{/*` inside one opens no
/// comment), and a comment not closed as Go requires is kept (Helm refuses that template).
fn without_template_comments(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("/*") {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let inside = &rest[open + 2..];
        if let Some(len) = comment_len(inside) {
            out.push(' ');
            rest = &inside[len..];
            continue;
        }
        let end = action_len(inside);
        out.push_str(&rest[open..open + 2 + end]);
        rest = &inside[end..];
    }
    out.push_str(rest);
    out.into()
}

/// Go's template whitespace (around trim markers).
fn is_template_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// The length of the comment `inside` (what follows `{{`) begins with, through its `}}`:
/// `/* … */}}`, with a trim marker (`- ` before, ` -` after) or not; `None` when it is no
/// comment, or one Go would refuse.
fn comment_len(inside: &str) -> Option<usize> {
    let b = inside.as_bytes();
    let start = match b {
        [b'-', space, ..] if is_template_space(*space) => 2,
        _ => 0,
    };
    let body = inside.get(start..)?.strip_prefix("/*")?;
    let close = body.find("*/")?;
    let mut at = start + 2 + close + 2;
    if let [space, b'-', ..] = &b[at..]
        && is_template_space(*space)
    {
        at += 2;
    }
    inside[at..].starts_with("}}").then_some(at + 2)
}

/// The length of the action `inside` (what follows `{{`) through its `}}`, quoted strings
/// (`"…"`, `'…'`, `` `…` ``) skipped over; the whole rest when it does not end.
fn action_len(inside: &str) -> usize {
    let b = inside.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'}' if b.get(i + 1) == Some(&b'}') => return i + 2,
            quote @ (b'"' | b'\'' | b'`') => {
                i += 1;
                while i < b.len() && b[i] != quote {
                    // Escapes only in interpreted strings and characters.
                    i += if b[i] == b'\\' && quote != b'`' { 2 } else { 1 };
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    b.len()
}

/// Whether a chart whose template files call `calls` (file, [`functions_in`] it) may render
/// differently twice: one calls a function other than `lookup` (alone it is stable), or a
/// packaged subchart (`.tgz`, not read) is there. When not, the second rendering is spared.
pub fn may_differ(calls: &[(String, Vec<&str>)], packaged_subchart: bool) -> bool {
    packaged_subchart
        || calls
            .iter()
            .any(|(_, functions)| functions.iter().any(|f| *f != "lookup"))
}

/// One object of a rendering that differed in the next rendering.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Unstable {
    /// The template that rendered it, as Helm's `# Source:` comment names it
    /// (`app/charts/db/templates/secret.yaml`: the chart's name, then the path in it).
    pub source: String,
    /// `kind`.
    pub kind: String,
    /// `metadata.namespace` as rendered; `None` when the chart leaves it out.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

/// The documents of a `helm template` output by their `# Source:` comment, each template's in
/// order.
fn by_source(out: &str) -> BTreeMap<&str, Vec<&str>> {
    let mut docs: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for doc in split_documents(out) {
        let source = doc
            .lines()
            .find_map(|l| l.strip_prefix("# Source: "))
            .unwrap_or("")
            .trim();
        docs.entry(source).or_default().push(doc);
    }
    docs
}

/// The YAML documents of `out`, split at `---` lines, empty ones left out.
pub(crate) fn split_documents(out: &str) -> Vec<&str> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in out.split_inclusive('\n') {
        if line.trim_end() == "---" {
            docs.push(&out[start..at]);
            start = at + line.len();
        }
        at += line.len();
    }
    docs.push(&out[start..]);
    docs.retain(|d| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
    });
    docs
}

/// The objects of `first` that `second` (the same chart rendered again) does not render the
/// same, matched by template and place in it; sorted, each once.
pub fn differing(first: &str, second: &str) -> Vec<Unstable> {
    let again = by_source(second);
    let mut out = Vec::new();
    for (source, docs) in by_source(first) {
        let other = again.get(source).map(Vec::as_slice).unwrap_or_default();
        for (i, doc) in docs.iter().enumerate() {
            if other.get(i) != Some(doc) {
                out.push(identify(source, doc));
            }
        }
    }
    out.sort_by(|a, b| (&a.source, &a.kind, &a.name).cmp(&(&b.source, &b.kind, &b.name)));
    out.dedup();
    out
}

/// The identity of one rendered document; what is missing stays empty (the agent's decoding
/// reports malformed objects).
fn identify(source: &str, doc: &str) -> Unstable {
    let v: serde_json::Value = serde_saphyr::from_str(doc).unwrap_or_default();
    let text = |p: &str| v.pointer(p).and_then(|x| x.as_str()).unwrap_or("");
    Unstable {
        source: source.to_owned(),
        kind: text("/kind").to_owned(),
        namespace: Some(text("/metadata/namespace"))
            .filter(|n| !n.is_empty())
            .map(str::to_owned),
        name: text("/metadata/name").to_owned(),
    }
}

/// The repository path of a `# Source:` path (`app/templates/x.yaml`: chart name first) of the
/// chart in the repository folder `chart`.
pub fn repository_path(chart: &str, source: &str) -> String {
    match source.split_once('/') {
        Some((_, inside)) => format!("{}/{inside}", chart.trim_end_matches('/')),
        None => source.to_owned(),
    }
}

/// Objects without a namespace land in `default_namespace` when applied, unless their kind is
/// cluster-scoped: the common cluster-scoped kinds a chart generates values for are known here
/// (kas has no discovery of the agent's cluster).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "APIService",
    "PriorityClass",
    "StorageClass",
    "PersistentVolume",
    "IngressClass",
];

/// `Secret prod/web-auth (charts/app/templates/secret.yaml)`: the object where it lands, an
/// object left without a namespace in `default_namespace` ("" when the agent did not say), and
/// the template that rendered it.
pub fn describe(u: &Unstable, chart: &str, default_namespace: &str) -> String {
    let namespace = match &u.namespace {
        Some(ns) => Some(ns.as_str()),
        None if CLUSTER_SCOPED.contains(&u.kind.as_str()) => None,
        None if default_namespace.is_empty() => Some("<default_namespace>"),
        None => Some(default_namespace),
    };
    let at = repository_path(chart, &u.source);
    match namespace {
        Some(ns) => format!("{} {ns}/{} ({at})", u.kind, u.name),
        None => format!("{} {} ({at})", u.kind, u.name),
    }
}

/// Most objects one message names; the others are counted.
const MAX_NAMED: usize = 10;

/// Why `label` (`helm template charts/app`) cannot be applied as it is: the `unstable` objects
/// where they land, and the files of `calls` generating their values (or the packaged
/// subcharts, when no unpacked file calls such a function).
pub fn explain(
    label: &str,
    (chart, default_namespace): (&str, &str),
    unstable: &[Unstable],
    calls: &[(String, Vec<&str>)],
) -> String {
    let mut objects: Vec<String> = unstable
        .iter()
        .take(MAX_NAMED)
        .map(|u| describe(u, chart, default_namespace))
        .collect();
    if unstable.len() > MAX_NAMED {
        objects.push(format!("{} more", unstable.len() - MAX_NAMED));
    }
    let cause = if calls.is_empty() {
        "the chart's packaged subcharts (charts/*.tgz) generate their values".to_owned()
    } else {
        let calls: Vec<String> = calls
            .iter()
            .map(|(file, functions)| format!("{} in {file}", functions.join(", ")))
            .collect();
        format!("the chart calls {}", calls.join("; "))
    };
    format!(
        "{label} renders differently at every rendering: {} would get new content at each new commit or kas restart, replacing what running Pods use; {cause} (helm install keeps a generated value by looking it up in the cluster, but kas renders with helm template, where lookup finds nothing)",
        objects.join(", ")
    )
}

/// Warnings for the files of `calls` that call `lookup` outside helpers (`_*.tpl`, where
/// charts look up a value they would otherwise generate: [`explain`] covers it when it
/// matters): without a cluster it finds nothing, so the chart renders as if the object did not
/// exist.
pub fn lookup_warnings(calls: &[(String, Vec<&str>)]) -> Vec<String> {
    calls
        .iter()
        .filter(|(file, functions)| {
            let helper = file.rsplit('/').next().is_some_and(|n| n.starts_with('_'));
            !helper && functions.contains(&"lookup")
        })
        .map(|(file, _)| {
            format!(
                "{file} calls lookup, which finds nothing when kas renders (helm template has no cluster): the chart renders as if the object it looks up did not exist"
            )
        })
        .collect()
}

/// Warnings for the files of `calls` that read the clock (`now`, `unixEpoch`) when the two
/// renderings agreed: they did only because the template formats the clock coarsely (`now |
/// date "2006-01-02"`), so a rendering at another time — a new day, at the next commit or kas
/// restart — changes the objects without a commit (E14: a ConfigMap read `19:24`, then `19:25`
/// after a restart). A warning, not a refusal: the value may be harmless (a year in a comment).
pub fn clock_warnings(calls: &[(String, Vec<&str>)]) -> Vec<String> {
    calls
        .iter()
        .filter_map(|(file, functions)| {
            let clock: Vec<&str> = functions
                .iter()
                .copied()
                .filter(|f| matches!(*f, "now" | "unixEpoch"))
                .collect();
            (!clock.is_empty()).then(|| {
                format!(
                    "{file} reads the clock ({}): two renderings a moment apart agreed, but one at another time (the next commit, a kas restart) may not, changing the objects it renders without a commit; set the value in helm.values if it must stay",
                    clock.join(", ")
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_reading_the_clock_are_warned_of() {
        let calls = vec![
            ("charts/clock/templates/cm.yaml".to_owned(), vec!["now"]),
            (
                "charts/clock/templates/secret.yaml".to_owned(),
                vec!["randAlphaNum"],
            ),
        ];
        let said = clock_warnings(&calls);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].starts_with("charts/clock/templates/cm.yaml reads the clock (now)"),
            "{said:?}"
        );
    }

    #[test]
    fn functions_are_found_as_whole_words_only() {
        let t = "{{ randAlphaNum 10 }} {{- $s := lookup \"v1\" \"Secret\" }} nowhere randAlphaNumX";
        assert_eq!(functions_in(t), ["randAlphaNum", "lookup"]);
        assert_eq!(functions_in("{{ .Values.now }}x"), ["now"]);
        assert!(functions_in("{{ derivePassword 1 \"long\" }}").is_empty());
    }

    #[test]
    fn functions_named_only_in_template_comments_are_not_found() {
        let commented = "{{/* now */}}\n{{- /* uses\nrandAlphaNum 10 */ -}}\nkind: Secret\n";
        assert!(functions_in(commented).is_empty(), "{commented}");
        let called = "{{/* a comment */}}\n{{ now | date \"2006\" }}";
        assert_eq!(functions_in(called), ["now"]);
    }

    #[test]
    fn what_only_looks_like_a_comment_still_counts() {
        // Opened inside a string: the call between the two strings is real.
        let t = "{{ print \"{{/*\" }}{{ randAlpha 5 }}{{ print \"*/}}\" }}";
        assert_eq!(functions_in(t), ["randAlpha"]);
        let t = "{{ print `}}{{/*` }}{{ uuidv4 }}{{ print '*' }}*/}}";
        assert_eq!(functions_in(t), ["uuidv4"]);
        // Not a comment to Go (helm refuses them): kept.
        for t in [
            "{{/* now */ x}}",
            "{{-/* now */}}",
            "{{ /* now */}}",
            "{{/* now }}",
        ] {
            assert_eq!(functions_in(t), ["now"], "{t}");
        }
        // A YAML comment is output: its actions run.
        assert_eq!(functions_in("# {{ now }}"), ["now"]);
        assert_eq!(functions_in("# now, as text"), ["now"]);
    }

    #[test]
    fn only_random_functions_or_a_packaged_subchart_call_for_a_second_rendering() {
        let calls =
            |functions: &[&'static str]| vec![("c/templates/x.yaml".into(), functions.to_vec())];
        assert!(!may_differ(&calls(&["lookup"]), false));
        assert!(!may_differ(&[], false));
        assert!(may_differ(&[], true));
        assert!(may_differ(&calls(&["lookup", "genCA"]), false));
    }

    const FIRST: &str = "---\n# Source: app/charts/db/templates/x.yaml\napiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: data\nstringData:\n  u: 1\n---\n# Source: app/templates/s.yaml\napiVersion: v1\nkind: Secret\nmetadata:\n  name: pw\nstringData:\n  p: abc\n---\n# Source: app/templates/s.yaml\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: same\n";

    #[test]
    fn the_documents_that_differ_are_named_by_template_kind_and_name() {
        let second = FIRST.replace("p: abc", "p: xyz").replace("u: 1", "u: 2");
        assert_eq!(
            differing(FIRST, &second),
            [
                Unstable {
                    source: "app/charts/db/templates/x.yaml".into(),
                    kind: "Secret".into(),
                    namespace: Some("data".into()),
                    name: "db".into(),
                },
                Unstable {
                    source: "app/templates/s.yaml".into(),
                    kind: "Secret".into(),
                    namespace: None,
                    name: "pw".into(),
                },
            ]
        );
        assert!(differing(FIRST, FIRST).is_empty());
    }

    #[test]
    fn a_template_rendering_fewer_documents_the_second_time_counts_as_differing() {
        let second = FIRST.replace("---\n# Source: app/charts/db/templates/x.yaml\n", "---\n");
        let names: Vec<String> = differing(FIRST, &second)
            .into_iter()
            .map(|u| u.name)
            .collect();
        assert_eq!(names, ["db"]);
    }

    #[test]
    fn the_explanation_names_objects_files_and_functions() {
        let u = Unstable {
            source: "app/templates/secret.yaml".into(),
            kind: "Secret".into(),
            namespace: None,
            name: "pw".into(),
        };
        let calls = vec![(
            "charts/app/templates/_helpers.tpl".to_owned(),
            vec!["randAlphaNum", "lookup"],
        )];
        let text = explain(
            "helm template charts/app",
            ("charts/app", "apps"),
            std::slice::from_ref(&u),
            &calls,
        );
        for words in [
            "helm template charts/app renders differently at every rendering: Secret apps/pw (charts/app/templates/secret.yaml) would get new content",
            "the chart calls randAlphaNum, lookup in charts/app/templates/_helpers.tpl",
        ] {
            assert!(text.contains(words), "{words:?} not in {text}");
        }
        let packaged = explain("l", ("charts/app", "apps"), &vec![u; 12], &[]);
        for words in [
            "2 more would get",
            "the chart's packaged subcharts (charts/*.tgz)",
        ] {
            assert!(packaged.contains(words), "{words:?} not in {packaged}");
        }
    }

    #[test]
    fn lookups_outside_helpers_are_warned_of() {
        let calls = vec![
            ("c/templates/_helpers.tpl".to_owned(), vec!["lookup"]),
            ("c/templates/cm.yaml".to_owned(), vec!["lookup"]),
            ("c/templates/s.yaml".to_owned(), vec!["uuidv4"]),
        ];
        let warnings = lookup_warnings(&calls);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("c/templates/cm.yaml calls lookup"));
    }

    #[test]
    fn objects_are_described_where_they_land() {
        let u = |kind: &str, namespace: Option<&str>| Unstable {
            source: "app/charts/db/templates/x.yaml".into(),
            kind: kind.into(),
            namespace: namespace.map(str::to_owned),
            name: "n".into(),
        };
        let chart = "charts/app";
        assert_eq!(
            describe(&u("Secret", Some("data")), chart, "apps"),
            "Secret data/n (charts/app/charts/db/templates/x.yaml)"
        );
        assert_eq!(
            describe(&u("Secret", None), chart, "apps"),
            "Secret apps/n (charts/app/charts/db/templates/x.yaml)"
        );
        assert_eq!(
            describe(&u("MutatingWebhookConfiguration", None), chart, "apps"),
            "MutatingWebhookConfiguration n (charts/app/charts/db/templates/x.yaml)"
        );
    }
}
