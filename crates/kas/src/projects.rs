//! Stored projects as the Git mirrors see them.

use anyhow::{Context as _, Result};
use tether_git_source::ProjectSpec;

/// What the mirrors need to know of a stored project.
pub fn project_spec(p: &tether_store::Project) -> Result<ProjectSpec> {
    let remote = match &p.remote {
        None => None,
        Some(r) => {
            let mut remote = tether_git_source::Remote::parse(r)
                .with_context(|| format!("project {}: remote {r}", p.path))?;
            if let Some(file) = &p.credentials_file {
                let creds = tether_git_source::Credentials::from_file(file)
                    .with_context(|| format!("project {}: credentials file {file}", p.path))?;
                remote = remote
                    .with_credentials(creds)
                    .with_context(|| format!("project {}: credentials", p.path))?;
            }
            if p.ssh_key_file.is_some() || p.known_hosts_file.is_some() {
                let ssh = tether_git_source::SshAuth {
                    key_file: p.ssh_key_file.as_ref().map(Into::into),
                    known_hosts_file: p.known_hosts_file.as_ref().map(Into::into),
                };
                remote = remote
                    .with_ssh(ssh)
                    .with_context(|| format!("project {}: SSH keys", p.path))?;
            }
            Some(remote)
        }
    };
    // Signed commits only is a property of the project, not of an agent's configuration: the
    // configuration project itself must be verified before any agent configuration is read
    // from it, and one policy per project means every agent using its manifests gets the same
    // guarantee (a config.yaml cannot turn it off).
    let verify = (p.verify_allowed_signers_file.is_some() || p.verify_gpg_keyring_file.is_some())
        .then(|| tether_git_source::VerifyPolicy {
            allowed_signers_file: p.verify_allowed_signers_file.as_ref().map(Into::into),
            gpg_keyring_file: p.verify_gpg_keyring_file.as_ref().map(Into::into),
        });
    Ok(ProjectSpec {
        id: p.id,
        path: p.path.clone(),
        remote,
        verify,
    })
}
