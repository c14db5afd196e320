//! [`super::decode_file_with`]: where and how `post_build` variables are substituted.

use serde_json::json;

use super::*;

fn vars(pairs: &[(&str, &str)], strict: bool) -> Variables {
    let mut v = Variables::new(strict);
    for (k, val) in pairs {
        v.set(k, val);
    }
    v
}

fn objects(path: &str, text: &str, v: &Variables) -> Vec<Value> {
    decode_file_with(path, text.as_bytes(), Some(v))
        .expect("decodes")
        .iter()
        .map(Manifest::object)
        .collect()
}

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: ${cluster_name}-web
  labels:
    quoted: \"${replicas:=2}\"
spec:
  replicas: ${replicas:=2}
";

#[test]
fn an_unquoted_substitution_decodes_as_yaml_so_numbers_are_numbers() {
    let got = objects(
        "d.yaml",
        DEPLOYMENT,
        &vars(&[("cluster_name", "eu")], false),
    );
    assert_eq!(got[0]["metadata"]["name"], "eu-web");
    assert_eq!(got[0]["spec"]["replicas"], json!(2));
    assert_eq!(got[0]["metadata"]["labels"]["quoted"], json!("2"));
    let five = objects(
        "d.yaml",
        DEPLOYMENT,
        &vars(&[("cluster_name", "eu"), ("replicas", "5")], false),
    );
    assert_eq!(five[0]["spec"]["replicas"], json!(5));
}

#[test]
fn without_variables_nothing_is_substituted() {
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: $${x} ${y}\n";
    let none = decode_file_with("c.yaml", text.as_bytes(), None).expect("expands");
    assert_eq!(none[0].object()["data"]["k"], "$${x} ${y}");
    let empty =
        decode_file_with("c.yaml", text.as_bytes(), Some(&Variables::new(true))).expect("expands");
    assert_eq!(empty[0].object()["data"]["k"], "$${x} ${y}");
    let some = objects("c.yaml", text, &vars(&[("y", "Y")], false));
    assert_eq!(some[0]["data"]["k"], "${x} Y");
}

#[test]
fn objects_labelled_or_annotated_disabled_are_left_alone() {
    let text = "\
apiVersion: v1
kind: ConfigMap
metadata:
  name: script
  annotations:
    kustomize.toolkit.fluxcd.io/substitute: disabled
data:
  run.sh: echo ${1:-none} ${HOME}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: labelled
  labels:
    kustomize.toolkit.fluxcd.io/substitute: disabled
data:
  k: ${name}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: ${name}
";
    let got = objects("c.yaml", text, &vars(&[("name", "sub")], true));
    assert_eq!(got[0]["data"]["run.sh"], "echo ${1:-none} ${HOME}");
    assert_eq!(got[1]["data"]["k"], "${name}");
    assert_eq!(got[2]["metadata"]["name"], "sub");
}

#[test]
fn a_list_mixing_disabled_and_substituted_items_is_refused() {
    let text = "\
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}
- apiVersion: v1
  kind: ConfigMap
  metadata:
    name: b
    labels: {kustomize.toolkit.fluxcd.io/substitute: disabled}
  data: {k: '${x}'}
";
    let err = decode_file_with("l.yaml", text.as_bytes(), Some(&vars(&[("x", "1")], false)))
        .expect_err("refused");
    assert!(
        matches!(err, DecodeError::Substitute { line: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("separate documents"), "{err}");
}

#[test]
fn substitution_errors_name_the_file_and_line() {
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ${missing}\n";
    let err = decode_file_with(
        "m/c.yaml",
        text.as_bytes(),
        Some(&vars(&[("x", "1")], true)),
    )
    .expect_err("refused");
    assert_eq!(
        err.to_string(),
        "m/c.yaml:9: post_build variable substitution: variable \"missing\" is not set \
         (post_build.strict is on; set it, or write ${missing:=default})"
    );
}

#[test]
fn a_value_breaking_the_yaml_is_a_syntax_error_said_to_follow_substitution() {
    let text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  k: ${v}\n";
    let err = decode_file_with(
        "c.yaml",
        text.as_bytes(),
        Some(&vars(&[("v", "a: b")], false)),
    )
    .expect_err("refused");
    match &err {
        DecodeError::Syntax {
            line: 6, message, ..
        } => {
            assert!(
                message.contains("after post_build variable substitution"),
                "{err}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn json_files_are_substituted_in_their_strings() {
    let text = r#"{"apiVersion": "v1", "kind": "ConfigMap",
 "metadata": {"name": "${name}", "labels": {"${key:=team}": "x"}},
 "data": {"n": "${n:=1}"}}"#;
    let got = objects("c.json", text, &vars(&[("name", "j")], false));
    assert_eq!(got[0]["metadata"]["name"], "j");
    assert_eq!(got[0]["metadata"]["labels"]["team"], "x");
    assert_eq!(got[0]["data"]["n"], "1");
}
