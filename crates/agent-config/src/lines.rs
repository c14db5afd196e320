//! Key path → line lookup, for errors found after deserialization (duplicates, bad labels...).
//!
//! The typed structs carry no positions (they are compared, cloned and sent as JSON), so when a
//! validation rule fails we re-read the document into a position-annotated tree and look the
//! error's path up there. This only runs on the error path, so its cost does not matter.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// The line (1-based) where the node at `path` starts, in the syntax of the error paths
/// (`gitops.manifest_projects[1].id`). For a mapping entry this is the line of its key, so that
/// `ref:` followed by a nested block points at `ref:` itself.
pub(crate) fn line_of(yaml: &str, path: &str) -> Option<usize> {
    let root: Spanned<Node> = serde_saphyr::from_str(yaml).ok()?;
    let mut node = &root;
    let mut line = line_number(&root);
    for segment in segments(path)? {
        match (&node.value, segment) {
            (Node::Map(entries), Segment::Key(key)) => {
                let (key_node, value) = entries.iter().find(|(k, _)| k.value == key)?;
                line = line_number(key_node);
                node = value;
            }
            (Node::Seq(items), Segment::Index(index)) => {
                node = items.get(index)?;
                line = line_number(node);
            }
            _ => return None,
        }
    }
    line
}

fn line_number<T>(spanned: &Spanned<T>) -> Option<usize> {
    let line = usize::try_from(spanned.referenced.line()).ok()?;
    (line > 0).then_some(line)
}

#[derive(Debug, PartialEq)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

/// Splits `a.b[2].c` into `a`, `b`, `[2]`, `c`. Keys in this schema never contain `.` or `[`.
fn segments(path: &str) -> Option<Vec<Segment<'_>>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(at) => part.split_at(at),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let close = inner.find(']')?;
            out.push(Segment::Index(inner[..close].parse().ok()?));
            rest = &inner[close + 1..];
        }
        if !rest.is_empty() {
            return None;
        }
    }
    Some(out)
}

/// A YAML node with positions on every key and value.
#[derive(Debug)]
enum Node {
    Map(Vec<(Spanned<Key>, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Leaf,
}

/// A mapping key rendered as text; non-scalar keys cannot appear in an error path.
#[derive(Debug, PartialEq)]
struct Key(String);

impl PartialEq<&str> for Key {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Leaf)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
        Ok(Key(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
        Ok(Key(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
        Ok(Key(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Key, E> {
        Ok(Key(v.to_string()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        Ok(Key(v.to_owned()))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Key, E> {
        Ok(Key(String::new()))
    }
    fn visit_none<E: de::Error>(self) -> Result<Key, E> {
        Ok(Key(String::new()))
    }
    // A complex key (a mapping or sequence used as a key) can never match a schema key; it is
    // read and dropped so that the rest of the document still gets positions.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Key, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(Key(String::new()))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Key, A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Key(String::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_paths() {
        assert_eq!(
            segments("gitops.manifest_projects[1].paths[0].glob"),
            Some(vec![
                Segment::Key("gitops"),
                Segment::Key("manifest_projects"),
                Segment::Index(1),
                Segment::Key("paths"),
                Segment::Index(0),
                Segment::Key("glob"),
            ])
        );
        assert_eq!(segments("a[x]"), None);
        assert_eq!(segments(""), Some(vec![]));
    }

    #[test]
    fn finds_lines() {
        let yaml = "\
# comment
gitops:
  manifest_projects:
  - id: a/b
  - id: c/d
    ref:
      branch: main
";
        let cases = [
            ("gitops", Some(2)),
            ("gitops.manifest_projects", Some(3)),
            ("gitops.manifest_projects[0]", Some(4)),
            ("gitops.manifest_projects[1].id", Some(5)),
            ("gitops.manifest_projects[1].ref", Some(6)),
            ("gitops.manifest_projects[1].ref.branch", Some(7)),
            ("gitops.manifest_projects[2]", None),
            ("ci_access", None),
        ];
        for (path, want) in cases {
            assert_eq!(line_of(yaml, path), want, "{path}");
        }
    }
}
