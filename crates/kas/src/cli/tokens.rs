//! `kas token …`, `kas user-token …` and `kas kubeconfig`.

use anyhow::{Context, Result};
use kas::config::Config;
use tether_kas_api::AdminClient;

use super::args::{TokenCmd, UserTokenCmd};
use super::output::{Reported, Table, out, print_data, when};

/// Fetches the CI job's kubeconfig from kas's proxy.
pub async fn ci_kubeconfig(
    server: &str,
    id_token_file: &std::path::Path,
    ca: Option<&std::path::Path>,
    output: Option<&std::path::Path>,
) -> Result<()> {
    let token = std::fs::read_to_string(id_token_file)
        .with_context(|| format!("reading {}", id_token_file.display()))?;
    let ca_pem = ca
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fetcher = kas::jwks::HttpJwksFetcher::new(ca_pem.as_deref())?;
    let url = format!(
        "{}{}",
        server.trim_end_matches('/'),
        kas::kubeproxy::KUBECONFIG_PATH
    );
    let mut body = fetcher.get_with_bearer(&url, token.trim()).await?;
    if let Some(pem) = &ca_pem {
        body = trusting(&body, pem).context("reading the kubeconfig kas answered")?;
    }
    match output {
        Some(p) => kas::auth::write_private(p, &body)?,
        None => std::io::Write::write_all(&mut super::output::Stdout, body.as_bytes())?,
    }
    Ok(())
}

/// The kubeconfig `body` (JSON, as kas answers) with `ca_pem` as the CA of each cluster kas
/// named none for (kas has no `kubernetes_api.ca_file`). The job's `--ca-cert-file` is what it
/// trusts the proxy by; kubectl had to trust it too, or failed with "certificate signed by
/// unknown authority". A CA kas named stays. Pure.
fn trusting(body: &str, ca_pem: &[u8]) -> Result<String> {
    use base64::Engine as _;
    let mut doc: serde_json::Value = serde_json::from_str(body)?;
    let data = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let clusters = doc["clusters"].as_array_mut().into_iter().flatten();
    for cluster in clusters.filter_map(|c| c["cluster"].as_object_mut()) {
        cluster
            .entry("certificate-authority-data")
            .or_insert_with(|| serde_json::Value::from(data.clone()));
    }
    Ok(serde_json::to_string_pretty(&doc)?)
}

pub async fn user_token_cmd(c: &AdminClient, cfg: &Config, cmd: &UserTokenCmd) -> Result<()> {
    match cmd {
        UserTokenCmd::Create {
            agent_id,
            username,
            members,
            expires_in,
            kubeconfig,
            server,
            ca_cert_file,
        } => {
            // Settle where the kubeconfig goes and what it trusts before issuing a token, so a
            // mistake here leaves no token behind.
            let kc_target = kubeconfig
                .as_ref()
                .map(|file| {
                    person_kubeconfig_target(cfg, server.as_deref(), ca_cert_file.as_deref())
                        .map(|t| (file, t))
                })
                .transpose()?;
            let req = kas::api::UserTokenRequest {
                username: username.clone(),
                memberships: members.clone(),
                expires_in_seconds: Some(i64::try_from(expires_in.as_secs()).unwrap_or(i64::MAX)),
            };
            let t = c
                .create_user_token(c.resolve_agent(agent_id).await?, &req)
                .await?;
            out!(
                "token_id: {}\ntoken: pat:{}:{}\nexpires_at: {}",
                t.token_id,
                t.agent_id,
                t.token,
                when(t.expires_at)
            )?;
            for w in &t.warnings {
                eprintln!("warning: {w}");
            }
            if let Some((file, target)) = kc_target {
                write_person_kubeconfig(c, &t, file, &target).await?;
            }
        }
        UserTokenCmd::List { agent, format } => {
            let agent_id = match agent {
                Some(a) => Some(c.resolve_agent(a).await?),
                None => None,
            };
            let tokens = c.list_user_tokens(agent_id).await?;
            if !print_data(format.format(), &tokens)? {
                print_user_tokens(tokens)?;
            }
        }
        UserTokenCmd::Revoke { token_id } => {
            let r = c.revoke_user_token(*token_id).await?;
            // In words, as `kas token revoke` (it printed the API's JSON answer).
            out!(
                "personal access token {} revoked (was active: {}, requests ended: {})",
                r["token_id"].as_i64().unwrap_or(*token_id),
                r["was_active"].as_bool().unwrap_or(false),
                r["requests_ended"].as_u64().unwrap_or(0)
            )?;
            not_told(r["replicas_not_told"].as_str())?;
        }
    }
    Ok(())
}

/// Where a person's kubeconfig points and the CA it trusts (PEM).
struct KubeconfigTarget {
    server: String,
    ca_pem: Option<Vec<u8>>,
}

fn person_kubeconfig_target(
    cfg: &Config,
    server: Option<&str>,
    ca_cert_file: Option<&std::path::Path>,
) -> Result<KubeconfigTarget> {
    let server = server
        .map(str::to_owned)
        .or_else(|| cfg.kubernetes_api.public_url.clone())
        .context(
            "--kubeconfig needs --server (or kubernetes_api.public_url in kas's configuration)",
        )?;
    let ca_file = ca_cert_file.or(cfg.kubernetes_api.ca_file.as_deref());
    let ca_pem = ca_file
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    Ok(KubeconfigTarget { server, ca_pem })
}

async fn write_person_kubeconfig(
    c: &AdminClient,
    t: &kas::api::UserTokenCreated,
    file: &std::path::Path,
    target: &KubeconfigTarget,
) -> Result<()> {
    let agent = c
        .list_agents()
        .await?
        .into_iter()
        .find(|a| a.id == t.agent_id)
        .context("the agent disappeared")?;
    let name = format!("{}:{}", agent.project, agent.name);
    let mut kc =
        tether_kubeproxy_server::Kubeconfig::new(&target.server, target.ca_pem.as_deref())?;
    kc.add_context(&name, &format!("pat:{}:{}", t.agent_id, t.token), None)?;
    kas::auth::write_private(file, &format!("{}\n", kc.to_json()?))
        .with_context(|| format!("writing {}", file.display()))?;
    eprintln!("kubeconfig written to {} (context {name})", file.display());
    Ok(())
}

pub async fn token_cmd(c: &AdminClient, cmd: &TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create {
            agent_id,
            description,
        } => {
            let t = c
                .create_token(c.resolve_agent(agent_id).await?, description)
                .await?;
            out!("token_id: {}\ntoken: {}", t.token_id, t.token)?;
        }
        TokenCmd::List { agent_id, format } => {
            let tokens = c.list_tokens(c.resolve_agent(agent_id).await?).await?;
            // Every token names the same replicas: those that did not answer this listing.
            let tokens_unknown = tokens
                .first()
                .map(|t| t.streams_unknown_on.clone())
                .unwrap_or_default();
            if print_data(format.format(), &tokens)? {
                return streams_unknown(&tokens_unknown);
            }
            let header = [
                "ID",
                "STATE",
                "CREATED",
                "LAST USED",
                "STREAMS",
                "DESCRIPTION",
            ];
            let mut t = Table::new(&header);
            for tok in tokens {
                let state = if tok.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                t.row(vec![
                    tok.id.to_string(),
                    state.into(),
                    when(tok.created_at),
                    tok.last_used_at.map_or_else(|| "never".to_owned(), when),
                    tok.open_streams.to_string(),
                    tok.description,
                ]);
            }
            t.print()?;
            streams_unknown(&tokens_unknown)?;
        }
        TokenCmd::Revoke { token_id } => {
            let r = c.revoke_token(*token_id).await?;
            out!(
                "token {} revoked (was active: {}, live streams ended: {})",
                r.token_id,
                r.was_active,
                r.streams_ended
            )?;
            not_told(r.replicas_not_told.as_deref())?;
        }
    }
    Ok(())
}

/// `kas token list` when a replica did not say its streams: STREAMS misses them, so a 0 does
/// not mean the token can be revoked without ending streams. Said on stderr, exit
/// [`crate::cli::agent::EXIT_CONNECTION_UNKNOWN`] (as the agent list with a silent replica).
fn streams_unknown(replicas: &[String]) -> Result<()> {
    if replicas.is_empty() {
        return Ok(());
    }
    eprintln!(
        "kas: STREAMS misses the streams open on {}, which did not answer",
        replicas.join(", ")
    );
    Err(Reported {
        code: crate::cli::agent::EXIT_CONNECTION_UNKNOWN,
    }
    .into())
}

/// Exit code of a revocation stored but not told to the other replicas at once: their live
/// streams of the token go on until they hear of it.
const EXIT_REPLICAS_NOT_TOLD: u8 = 2;

/// A revocation the other replicas were not told of is no plain success: said on stderr, exit 2.
fn not_told(note: Option<&str>) -> Result<()> {
    let Some(note) = note else { return Ok(()) };
    eprintln!("kas: warning: the token is revoked, but {note}");
    Err(Reported {
        code: EXIT_REPLICAS_NOT_TOLD,
    }
    .into())
}

/// `kas user-token list`'s table: never the token, which kas does not have.
fn print_user_tokens(tokens: Vec<tether_kas_api::UserTokenView>) -> Result<()> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut t = Table::new(&["ID", "AGENT", "USERNAME", "STATE", "EXPIRES", "MEMBERSHIPS"]);
    for tok in tokens {
        // kas's judgement when it gives one (its clock is the one requests are judged by).
        let state = match (&tok.state, tok.revoked_at) {
            (Some(s), _) => s.clone(),
            (None, Some(_)) => "revoked".to_owned(),
            (None, None) if tok.expires_at <= now => "expired".to_owned(),
            (None, None) => "active".to_owned(),
        };
        let members: Vec<String> = tok
            .memberships
            .iter()
            .map(|m| serde_json::to_value(m).map(|v| membership_word(&v)))
            .collect::<Result<_, _>>()?;
        t.row(vec![
            tok.id.to_string(),
            tok.agent_id.to_string(),
            tok.username,
            state,
            when(tok.expires_at),
            members.join(","),
        ]);
    }
    t.print()
}

/// `kind:path:role` of a membership's JSON (as `--member` takes it, without the id).
fn membership_word(v: &serde_json::Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    format!("{}:{}:{}", s("kind"), s("path"), s("access_level"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_jobs_ca_is_written_for_clusters_kas_named_no_ca_for() {
        let body = r#"{"clusters":[
            {"name":"a","cluster":{"server":"https://kas:8154"}},
            {"name":"b","cluster":{"server":"https://kas:8154","certificate-authority-data":"S0FT"}}
        ]}"#;
        let out: serde_json::Value =
            serde_json::from_str(&trusting(body, b"-----BEGIN CERTIFICATE-----").unwrap()).unwrap();
        let ca = |i: usize| out["clusters"][i]["cluster"]["certificate-authority-data"].clone();
        assert_eq!(ca(0), "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t");
        assert_eq!(ca(1), "S0FT", "kas's CA stays");
        assert_eq!(out["clusters"][0]["cluster"]["server"], "https://kas:8154");
    }
}
