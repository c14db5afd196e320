//! What `kas agent register` prints so the new agent can be installed at once, as GitLab's UI
//! does after registration: the Helm commands (the token through a file and a Secret, never on a
//! command line) and the plain-manifests alternative, with kas's address filled in. Pure text
//! building; the CLI writes it.

/// agentk's plain manifests, rendered from `deploy/helm/agentk` by scripts/render-manifests
/// (a test keeps the file current with the chart), for namespace `gitlab-agent`.
const MANIFESTS: &str = include_str!("../../../deploy/manifests/agentk.yaml");
/// The placeholders in [`MANIFESTS`].
const EXAMPLE_ADDRESS: &str = "grpcs://kas.example.com:8150";
const EXAMPLE_NAMESPACE: &str = "gitlab-agent";
/// The token Secret [`MANIFESTS`] mounts.
const SECRET_NAME: &str = "agentk-token";

/// Where and how the agent is installed.
#[derive(Debug, Clone)]
pub struct InstallTarget<'a> {
    /// The address agentk dials, as seen from the cluster.
    pub kas_address: &'a str,
    pub namespace: &'a str,
    /// The release (Helm) name, the agent's name by default.
    pub release: &'a str,
}

/// The name of the Secret the Helm instructions make from the token file: not the chart's
/// own `<fullname>-token`, which a later `helm upgrade` with `config.token` would manage (and
/// delete when unset again).
fn helm_secret_name(release: &str) -> String {
    format!("{release}-agent-token")
}

/// The install commands, for a terminal. The token is not in them: a command line stays in the
/// shell's history and shows in `ps` to every user of the machine, so the token goes through a
/// file into a Secret the chart mounts (`config.secretName`); `--output-manifests` writes it
/// into a file readable by its owner only.
pub fn instructions(t: &InstallTarget<'_>, manifests_file: Option<&str>) -> String {
    let mut s = format!(
        "\nInstall agentk with Helm (chart deploy/helm/agentk of the tether repository). Keep the\n\
         token off command lines (shell history, ps): save it in a file, e.g. run\n\
         `(umask 077; cat > agentk.token)`, paste it and press Ctrl-D; then:\n\n  \
         kubectl create namespace {ns}   # unless it exists\n  \
         kubectl -n {ns} create secret generic {secret} --from-file=token=agentk.token\n  \
         helm upgrade --install {release} deploy/helm/agentk \\\n    \
         --namespace {ns} \\\n    \
         --set config.kasAddress={addr} \\\n    \
         --set config.secretName={secret}\n\n\
         Least privilege (recommended): add --set 'rbac.namespaces={{ns1,ns2}}' to grant the agent\n\
         only the namespaces it manages instead of cluster-admin.\n\n\
         Or without Helm:\n\n",
        release = t.release,
        ns = t.namespace,
        addr = t.kas_address,
        secret = helm_secret_name(t.release),
    );
    match manifests_file {
        Some(f) => s.push_str(&format!("  kubectl apply --server-side -f {f}\n")),
        None => s.push_str(
            "  kas agent register ... --output-manifests agentk.yaml   (writes them with the \
             token)\n  kubectl apply --server-side -f agentk.yaml\n",
        ),
    }
    s
}

/// Ready-to-apply manifests: the Namespace, the token Secret and agentk (cluster-admin), for
/// this kas address and namespace.
pub fn manifests(t: &InstallTarget<'_>, token: &str) -> String {
    let body: String = MANIFESTS
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| {
            l.replace(EXAMPLE_ADDRESS, t.kas_address)
                .replace(EXAMPLE_NAMESPACE, t.namespace)
        })
        .collect::<Vec<_>>()
        .join("\n");
    // The token as JSON string: valid YAML for any characters it might hold.
    let token_json = serde_json::Value::String(token.to_owned()).to_string();
    format!(
        "# agentk for kas at {addr}, written by `kas agent register`. It holds the agent's token:\n\
         # keep it as secret as the token. Apply with: kubectl apply --server-side -f FILE\n\
         {body}\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {SECRET_NAME}\n  \
         namespace: {ns}\ntype: Opaque\nstringData:\n  token: {token_json}\n",
        addr = t.kas_address,
        ns = t.namespace,
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const T: InstallTarget<'static> = InstallTarget {
        kas_address: "wss://kas.corp:443/agent",
        namespace: "agents",
        release: "prod-agent",
    };

    #[test]
    fn instructions_fill_in_the_address_and_the_namespace_and_keep_the_token_in_a_file() {
        let text = instructions(&T, None);
        assert!(text.contains("helm upgrade --install prod-agent deploy/helm/agentk"));
        assert!(text.contains("kubectl create namespace agents"));
        assert!(text.contains(
            "kubectl -n agents create secret generic prod-agent-agent-token --from-file=token=agentk.token"
        ));
        assert!(text.contains("--namespace agents \\\n"));
        assert!(text.contains("--set config.kasAddress=wss://kas.corp:443/agent"));
        assert!(text.contains("--set config.secretName=prod-agent-agent-token"));
        assert!(!text.contains("config.token"), "{text}");
        assert!(text.contains("--output-manifests agentk.yaml"));
        let text = instructions(&T, Some("out.yaml"));
        assert!(text.contains("kubectl apply --server-side -f out.yaml"));
    }

    #[test]
    fn manifests_carry_the_address_the_namespace_and_the_token_secret() {
        let yaml = manifests(&T, "tether_a\"b");
        assert!(!yaml.contains(EXAMPLE_ADDRESS));
        assert!(!yaml.contains(EXAMPLE_NAMESPACE));
        assert!(yaml.contains("--kas-address=wss://kas.corp:443/agent"));
        assert!(yaml.contains("kind: Namespace\nmetadata:\n  name: agents"));
        assert!(yaml.contains("secretName: agentk-token"));
        assert!(yaml.contains("stringData:\n  token: \"tether_a\\\"b\"\n"));
        // Every document is YAML with a kind.
        let docs: Vec<&str> = yaml.split("\n---\n").collect();
        assert!(docs.len() >= 5, "{}", docs.len());
        for d in docs.iter().skip(1) {
            assert!(d.contains("kind: "), "{d}");
        }
    }
}
