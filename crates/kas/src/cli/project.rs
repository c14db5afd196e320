//! `kas project …`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tether_kas_api::AdminClient;

use super::args::ProjectCmd;
use super::output::{Table, out, print_data, short};

fn absolute(p: &std::path::Path) -> Result<String> {
    let abs = std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))?;
    Ok(abs.display().to_string())
}

pub async fn project_cmd(c: &AdminClient, cmd: &ProjectCmd) -> Result<()> {
    match cmd {
        ProjectCmd::Add {
            path,
            remote,
            credentials_file,
            webhook_secret_file,
            ssh_key_file,
            known_hosts_file,
            verify_allowed_signers,
            verify_gpg_keyring,
        } => {
            let file = |f: &Option<PathBuf>| f.as_deref().map(absolute).transpose();
            let req = kas::api::ProjectRequest {
                path: path.clone(),
                remote: Some(remote.clone()),
                credentials_file: credentials_file.as_deref().map(absolute).transpose()?,
                webhook_secret_file: webhook_secret_file.as_deref().map(absolute).transpose()?,
                ssh_key_file: file(ssh_key_file)?,
                known_hosts_file: file(known_hosts_file)?,
                verify_allowed_signers_file: file(verify_allowed_signers)?,
                verify_gpg_keyring_file: file(verify_gpg_keyring)?,
            };
            let p = c.set_project(&req).await?;
            out!("project {} (id {}) mirrors {}", p.path, p.id, remote)?;
            if p.webhooks {
                out!(
                    "push webhook URL: <kas internal API>/webhooks/projects/{}",
                    p.id
                )?;
            }
        }
        ProjectCmd::List { format } => {
            let projects = c.list_projects().await?;
            if !print_data(format.format(), &projects)? {
                print_projects(projects)?;
            }
        }
        ProjectCmd::Remove { path } => {
            c.remove_project(path).await?;
            out!("project {path} removed")?;
        }
    }
    Ok(())
}

/// `kas project list`'s table; a fetch error or a refused commit follows its project's row.
fn print_projects(projects: Vec<tether_kas_api::ProjectView>) -> Result<()> {
    let mut t = Table::new(&["ID", "PATH", "COMMIT", "FETCHED", "REMOTE"]);
    let mut notes = Vec::new();
    for p in projects {
        if let Some(e) = &p.fetch_error {
            notes.push(format!("{}: fetch error: {e}", p.path));
        }
        // Only printed when there is one, so nothing changes for other projects.
        if let Some(r) = &p.refusal {
            let signer = r
                .signer
                .as_ref()
                .map(|s| format!(" (signer {s})"))
                .unwrap_or_default();
            notes.push(format!(
                "{}: refused: commit {}{signer}: {}",
                p.path, r.commit, r.reason
            ));
        }
        t.row(vec![
            p.id.to_string(),
            p.path,
            p.commit.as_deref().map_or("-", short).to_owned(),
            p.last_fetch.unwrap_or_else(|| "-".into()),
            p.remote.unwrap_or_else(|| "(no repository)".into()),
        ]);
    }
    t.print()?;
    for n in notes {
        out!("{n}")?;
    }
    Ok(())
}
