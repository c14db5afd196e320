//! The variables of one sync's `post_build`: its `substitute_from` ConfigMaps and Secrets, read
//! from the cluster with agentk's own rights at every sync (a change to them takes effect at the
//! next sync, as with Flux, which reads them at every reconciliation too), then `substitute`.
//!
//! Only names are ever put in errors, never values: a Secret's data must not leave the
//! cluster, and errors travel to kas.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use tether_agent_config::{
    PostBuild, SubstituteFrom, SubstituteKind, VARIABLE_NAME_RULE, is_variable_name,
};

use crate::substitute::Variables;
use crate::sync::{ApiError, SyncError};

/// Whether Secrets may be read: not by a preview, which runs in kas (through the agent's
/// tunnel), so that Secrets' values never leave the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    Read,
    Refuse,
}

/// Why one `substitute_from` reference failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("does not exist (create it, or set optional: true on the reference)")]
    NotFound,
    #[error("could not be read: {0}")]
    Api(ApiError),
    #[error(
        "names no namespace, and agentk's own namespace is unknown (set POD_NAMESPACE, or the reference's namespace)"
    )]
    NoNamespace,
    #[error("has key {0:?}, which is not a valid variable name (must match {VARIABLE_NAME_RULE})")]
    BadKey(String),
    #[error("has key {0:?}, whose value is not UTF-8 text")]
    NotText(String),
    #[error(
        "is a Secret, which a preview does not read (it runs in kas, and Secrets never leave the cluster); only a synchronization can use it"
    )]
    SecretInPreview,
}

/// The variables of `post_build` (`None` without one), `agent_namespace` being where
/// references without a namespace are looked up (empty: unknown).
pub(crate) async fn load(
    client: &Client,
    post_build: Option<&PostBuild>,
    agent_namespace: &str,
    secrets: Secrets,
) -> Result<Option<Variables>, SyncError> {
    let Some(pb) = post_build else {
        return Ok(None);
    };
    let mut read = Vec::with_capacity(pb.substitute_from.len());
    for (index, r) in pb.substitute_from.iter().enumerate() {
        let namespace = r.namespace.as_deref().unwrap_or(agent_namespace);
        let fail = |reason| SyncError::SubstituteFrom {
            index,
            kind: r.kind.as_str(),
            namespace: namespace.to_owned(),
            name: r.name.clone(),
            reason,
        };
        check(r, namespace, secrets).map_err(fail)?;
        match fetch(client, r, namespace).await.map_err(fail)? {
            Some(data) => read.push((index, data)),
            None if r.optional => {}
            None => return Err(fail(ReferenceError::NotFound)),
        }
    }
    merge(pb, read, agent_namespace).map(Some)
}

/// Whether reference `r` may be read, in `namespace` (the agent's when it names none).
fn check(r: &SubstituteFrom, namespace: &str, secrets: Secrets) -> Result<(), ReferenceError> {
    if namespace.is_empty() {
        return Err(ReferenceError::NoNamespace);
    }
    if r.kind == SubstituteKind::Secret && secrets == Secrets::Refuse {
        return Err(ReferenceError::SecretInPreview);
    }
    Ok(())
}

/// The data of one referenced object; `None` when it does not exist. Secret values are
/// decoded to text.
async fn fetch(
    client: &Client,
    r: &SubstituteFrom,
    namespace: &str,
) -> Result<Option<BTreeMap<String, String>>, ReferenceError> {
    match r.kind {
        SubstituteKind::ConfigMap => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            let cm = api
                .get_opt(&r.name)
                .await
                .map_err(|e| ReferenceError::Api(e.into()))?;
            Ok(cm.map(|cm| cm.data.unwrap_or_default()))
        }
        SubstituteKind::Secret => {
            let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
            let Some(secret) = api
                .get_opt(&r.name)
                .await
                .map_err(|e| ReferenceError::Api(e.into()))?
            else {
                return Ok(None);
            };
            let mut data = BTreeMap::new();
            for (key, bytes) in secret.data.unwrap_or_default() {
                let text =
                    String::from_utf8(bytes.0).map_err(|_| ReferenceError::NotText(key.clone()))?;
                data.insert(key, text);
            }
            Ok(Some(data))
        }
    }
}

/// The variables from the references read (`(index, data)`, in order: a later one wins) and
/// then `substitute` (which wins over all). A data key that is no variable name fails, as in
/// Flux.
pub(crate) fn merge(
    pb: &PostBuild,
    read: Vec<(usize, BTreeMap<String, String>)>,
    agent_namespace: &str,
) -> Result<Variables, SyncError> {
    let mut vars = Variables::new(pb.strict);
    for (index, data) in read {
        if let Some(bad) = data.keys().find(|k| !is_variable_name(k)) {
            let r = &pb.substitute_from[index];
            return Err(SyncError::SubstituteFrom {
                index,
                kind: r.kind.as_str(),
                namespace: r.namespace.as_deref().unwrap_or(agent_namespace).to_owned(),
                name: r.name.clone(),
                reason: ReferenceError::BadKey(bad.clone()),
            });
        }
        for (k, v) in &data {
            vars.set(k, v);
        }
    }
    for (k, v) in &pb.substitute {
        vars.set(k, v);
    }
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::substitute::expand;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn reference(kind: SubstituteKind, name: &str) -> SubstituteFrom {
        SubstituteFrom {
            kind,
            name: name.into(),
            namespace: None,
            optional: false,
        }
    }

    #[test]
    fn a_preview_refuses_secrets_and_a_reference_needs_a_namespace() {
        let secret = reference(SubstituteKind::Secret, "creds");
        let cm = reference(SubstituteKind::ConfigMap, "vars");
        assert_eq!(check(&secret, "agents", Secrets::Read), Ok(()));
        assert_eq!(
            check(&secret, "agents", Secrets::Refuse),
            Err(ReferenceError::SecretInPreview)
        );
        assert_eq!(check(&cm, "agents", Secrets::Refuse), Ok(()));
        assert_eq!(
            check(&cm, "", Secrets::Read),
            Err(ReferenceError::NoNamespace)
        );
    }

    #[test]
    fn later_references_win_and_substitute_wins_over_all() {
        let pb = PostBuild {
            substitute: data(&[("domain", "inline.example")]).into_iter().collect(),
            substitute_from: vec![
                reference(SubstituteKind::ConfigMap, "a"),
                reference(SubstituteKind::Secret, "b"),
            ],
            strict: true,
        };
        let read = vec![
            (
                0,
                data(&[("region", "eu"), ("tier", "cm"), ("domain", "cm")]),
            ),
            (1, data(&[("tier", "secret")])),
        ];
        let vars = merge(&pb, read, "agents").expect("merges");
        let got = expand("${region} ${tier} ${domain}", &vars).expect("expands");
        assert_eq!(got, "eu secret inline.example");
    }

    #[test]
    fn a_data_key_that_is_no_variable_name_names_the_object_not_the_value() {
        let pb = PostBuild {
            substitute_from: vec![reference(SubstituteKind::Secret, "creds")],
            ..PostBuild::default()
        };
        let read = vec![(0, data(&[("api.key", "s3cr3t")]))];
        let err = merge(&pb, read, "agents").expect_err("refused");
        let text = err.to_string();
        assert_eq!(
            text,
            "post_build.substitute_from[0]: Secret agents/creds has key \"api.key\", which is \
             not a valid variable name (must match ^[_[:alpha:]][_[:alpha:][:digit:]]*$); \
             nothing was applied"
        );
        assert!(!text.contains("s3cr3t"));
    }
}
