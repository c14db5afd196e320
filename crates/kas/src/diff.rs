//! `kas agent diff AGENT --ref REF`: what a synchronization of REF would change in the agent's
//! cluster, printed like `flux diff kustomization`, with an exit code a merge-request pipeline
//! can act on: 0 nothing would change, 1 something would, 2 the preview failed (in part).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;

use tether_kas_api::{
    AdminClient, AgentRef, ClientError, DiffChange, DiffRequest, DiffView, ProjectDiffView,
};

/// Nothing would change.
pub const EXIT_NO_CHANGES: u8 = 0;
/// Something would be created, changed or pruned.
pub const EXIT_CHANGES: u8 = 1;
/// The preview failed, wholly or for some project or object: its answer is incomplete.
pub const EXIT_ERROR: u8 = 2;
/// The agent is not connected: nothing was previewed (as `kas agent ping`).
pub const EXIT_NOT_CONNECTED: u8 = 4;

/// The command line of `kas agent diff`.
#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// The agent: its id or `<configuration project path>:<agent name>`.
    pub agent: AgentRef,
    /// Branch, tag or full commit id of the manifest project to preview.
    #[arg(long = "ref", value_name = "REF")]
    pub git_ref: String,
    /// The manifest project REF is of (path or id as in the agent's configuration); required
    /// when the agent has several. The others are shown at the ref they follow, but only this
    /// one decides the exit code.
    #[arg(long)]
    pub project: Option<String>,
    /// `text` (like `flux diff`) or `json`.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Ask through kas's Kubernetes API proxy at this URL (as for `kas kubeconfig`), as a CI
    /// job with its ID token, instead of the internal API with the admin token.
    #[arg(long, requires = "id_token_file")]
    pub server: Option<String>,
    /// The CI job's ID token (with `--server`).
    #[arg(long, requires = "server")]
    pub id_token_file: Option<PathBuf>,
    /// PEM CA trusted for the proxy (with `--server`; default: the system's roots).
    #[arg(long, requires = "server")]
    pub ca_cert_file: Option<PathBuf>,
}

/// Output formats.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// The exit code for a preview of `project` (`--project`; `None`: the agent's only one): an
/// error wins (an incomplete answer must not pass for "no changes" or be taken as a plain
/// "changes"), then any change. Only the project REF is of counts: the others are shown at the
/// ref they follow, and their drift or failure is not the merge request's.
pub fn exit_code(view: &DiffView, project: Option<&str>) -> u8 {
    let judged = view.judged(project);
    // An answer without the project asked about is incomplete.
    if judged.is_empty() || judged.iter().any(|p| p.has_errors()) {
        EXIT_ERROR
    } else if judged.iter().any(|p| p.has_changes()) {
        EXIT_CHANGES
    } else {
        EXIT_NO_CHANGES
    }
}

/// Asks kas's internal API for the preview (as the agent's ServiceAccount), prints it to `out`
/// and returns the exit code.
pub async fn run(c: &AdminClient, args: &DiffArgs, out: &mut impl Write) -> anyhow::Result<u8> {
    let agent_id = c.resolve_agent(&args.agent).await?;
    let view = c.diff(agent_id, &request(args)).await?;
    print(&view, args, out)
}

/// Asks kas's Kubernetes API proxy (`--server`) for the preview as the CI job whose ID token
/// is in `--id-token-file`, with the identity the agent's `ci_access` gives it; prints it and
/// returns the exit code. An agent given by name is looked up in the job's kubeconfig.
pub async fn run_as_ci_job(args: &DiffArgs, out: &mut impl Write) -> anyhow::Result<u8> {
    let (Some(server), Some(file)) = (&args.server, &args.id_token_file) else {
        anyhow::bail!("--server and --id-token-file go together");
    };
    let jwt = std::fs::read_to_string(file)
        .with_context(|| format!("reading the ID token {}", file.display()))?;
    let jwt = jwt.trim();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = args.ca_cert_file.as_deref();
    let agent_id = match &args.agent {
        AgentRef::Id(id) => *id,
        AgentRef::Name { project, name } => {
            let kubeconfig = AdminClient::new(server, jwt)
                .trusting(ca)?
                .proxy_kubeconfig()
                .await?;
            agent_in_kubeconfig(&kubeconfig, &format!("{project}:{name}"))
                .with_context(|| format!("this job may not use agent {project}:{name}"))?
        }
    };
    let proxy = AdminClient::new(server, &format!("ci:{agent_id}:{jwt}")).trusting(ca)?;
    let view = match proxy.proxy_diff(&request(args)).await {
        Err(ClientError::Status { status, message }) if not_connected(status, &message) => {
            eprintln!("kas: {message}");
            return Ok(EXIT_NOT_CONNECTED);
        }
        answer => answer?,
    };
    print(&view, args, out)
}

/// kas's answer that the agent is not connected (see `preview::Previews::connected`).
fn not_connected(status: http::StatusCode, message: &str) -> bool {
    status == http::StatusCode::SERVICE_UNAVAILABLE && message.contains("is not connected")
}

/// The id of the agent named `name` (`<project>:<agent>`) in a CI job's kubeconfig: its user's
/// token is `ci:<agent id>:<ID token>`.
pub fn agent_in_kubeconfig(kubeconfig: &serde_json::Value, name: &str) -> Option<i64> {
    kubeconfig["users"]
        .as_array()?
        .iter()
        .find(|u| u["name"] == name)?["user"]["token"]
        .as_str()?
        .strip_prefix("ci:")?
        .split_once(':')?
        .0
        .parse()
        .ok()
}

fn request(args: &DiffArgs) -> DiffRequest {
    DiffRequest {
        git_ref: args.git_ref.clone(),
        project: args.project.clone(),
    }
}

fn print(view: &DiffView, args: &DiffArgs, out: &mut impl Write) -> anyhow::Result<u8> {
    let project = args.project.as_deref();
    match args.output {
        Output::Json => writeln!(out, "{}", serde_json::to_string_pretty(view)?)?,
        Output::Text => out.write_all(render(view, project).as_bytes())?,
    }
    out.flush()?;
    Ok(exit_code(view, project))
}

/// The text output: per project a header, then each object that would change (`►`, with the
/// diff of a changed one) or fail (`✗`), and `no changes` when nothing would in the project
/// the exit code is about (`project`, named when the agent's others are shown too).
pub fn render(view: &DiffView, project: Option<&str>) -> String {
    let mut s = String::new();
    for p in &view.projects {
        render_project(p, &mut s);
    }
    if exit_code(view, project) != EXIT_NO_CHANGES {
        return s;
    }
    let judged = view.judged(project);
    if judged.len() < view.projects.len() {
        // The others may show changes or failures: say which project "no changes" is about.
        let names: Vec<&str> = judged.iter().map(|p| p.project.as_str()).collect();
        s.push_str(&format!("✔ no changes in {}\n", names.join(", ")));
    } else {
        s.push_str("✔ no changes\n");
    }
    s
}

fn render_project(p: &ProjectDiffView, s: &mut String) {
    let commit = match (&p.commit, &p.unresolved) {
        (Some(c), _) => c[..c.len().min(12)].to_owned(),
        (None, Some(why)) => format!("(ref not resolved: {why})"),
        (None, None) => "(no commit resolved)".to_owned(),
    };
    s.push_str(&format!("◎ {} at {} {commit}\n", p.project, p.git_ref));
    if let Some(e) = &p.error {
        s.push_str(&format!("✗ {e}\n"));
    }
    for w in &p.warnings {
        s.push_str(&format!("! {w}\n"));
    }
    for o in &p.objects {
        let name = if o.namespace.is_empty() {
            format!("{}/{}", o.kind, o.name)
        } else {
            format!("{}/{}/{}", o.kind, o.namespace, o.name)
        };
        match o.change {
            DiffChange::Unchanged => {}
            DiffChange::Created => s.push_str(&format!("► {name} created\n")),
            DiffChange::Pruned => s.push_str(&format!("► {name} deleted\n")),
            DiffChange::Changed => {
                s.push_str(&format!("► {name} drifted\n"));
                s.push_str(&o.diff);
                if !o.diff.ends_with('\n') {
                    s.push('\n');
                }
            }
            DiffChange::Failed => {
                let why = o.error.as_deref().unwrap_or("failed");
                s.push_str(&format!("✗ {name}: {why}\n"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_kas_api::ObjectDiffView;

    fn object(kind: &str, namespace: &str, name: &str, change: DiffChange) -> ObjectDiffView {
        ObjectDiffView {
            group: String::new(),
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
            change,
            diff: if change == DiffChange::Changed {
                "--- a\n+++ b\n@@ -1 +1 @@\n-  replicas: 1\n+  replicas: 2\n".into()
            } else {
                String::new()
            },
            error: (change == DiffChange::Failed).then(|| "forbidden (403 Forbidden)".into()),
        }
    }

    fn view(objects: Vec<ObjectDiffView>, error: Option<&str>) -> DiffView {
        DiffView {
            agent_id: 1,
            projects: vec![ProjectDiffView {
                project: "g/manifests".into(),
                git_ref: "feature".into(),
                commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
                unresolved: None,
                error: error.map(str::to_owned),
                warnings: Vec::new(),
                objects,
            }],
        }
    }

    #[test]
    fn a_ci_jobs_agent_is_found_by_name_in_its_kubeconfig() {
        let kubeconfig = serde_json::json!({
            "users": [
                {"name": "group/config:prod", "user": {"token": "ci:17:eyJ.x.y"}},
                {"name": "group/config:dev", "user": {"token": "ci:4:eyJ.x.y"}},
                {"name": "group/config:odd", "user": {"token": "pat:5:t"}},
            ],
        });
        assert_eq!(
            agent_in_kubeconfig(&kubeconfig, "group/config:prod"),
            Some(17)
        );
        assert_eq!(
            agent_in_kubeconfig(&kubeconfig, "group/config:dev"),
            Some(4)
        );
        assert_eq!(agent_in_kubeconfig(&kubeconfig, "group/config:odd"), None);
        assert_eq!(agent_in_kubeconfig(&kubeconfig, "group/config:nope"), None);
        assert_eq!(agent_in_kubeconfig(&serde_json::json!({}), "a:b"), None);
    }

    #[test]
    fn exit_code_is_0_unchanged_1_changed_2_on_any_error() {
        let unchanged = object("Deployment", "app", "web", DiffChange::Unchanged);
        assert_eq!(exit_code(&view(vec![unchanged.clone()], None), None), 0);
        assert_eq!(exit_code(&view(Vec::new(), None), None), 0);
        for change in [DiffChange::Created, DiffChange::Changed, DiffChange::Pruned] {
            let v = view(
                vec![unchanged.clone(), object("ConfigMap", "app", "c", change)],
                None,
            );
            assert_eq!(exit_code(&v, None), 1, "{change:?}");
        }
        let failed = object("ConfigMap", "other", "x", DiffChange::Failed);
        let created = object("ConfigMap", "app", "c", DiffChange::Created);
        assert_eq!(exit_code(&view(vec![created, failed], None), None), 2);
        assert_eq!(
            exit_code(&view(Vec::new(), Some("no branch nope")), None),
            2
        );
    }

    #[test]
    fn with_project_only_that_project_decides_the_exit_code_and_no_changes() {
        let same = object("ConfigMap", "app", "same", DiffChange::Unchanged);
        let mut v = view(vec![same], None);
        v.projects.push(ProjectDiffView {
            project: "g/other".into(),
            git_ref: "default branch".into(),
            error: Some("g/other is not a project known to kas".into()),
            objects: vec![object("ConfigMap", "app", "c", DiffChange::Created)],
            ..v.projects[0].clone()
        });
        assert_eq!(exit_code(&v, Some("G/Manifests ")), EXIT_NO_CHANGES);
        assert!(render(&v, Some("g/manifests")).ends_with("✔ no changes in g/manifests\n"));
        assert_eq!(exit_code(&v, Some("g/other")), EXIT_ERROR);
        assert_eq!(exit_code(&v, None), EXIT_ERROR);
        // An answer without the project asked about is incomplete, never "no changes".
        assert_eq!(exit_code(&v, Some("g/missing")), EXIT_ERROR);
        assert!(!render(&v, Some("g/missing")).contains("no changes"));
    }

    #[test]
    fn text_output_reads_like_flux_diff() {
        let v = view(
            vec![
                object("ConfigMap", "app", "new", DiffChange::Created),
                object("Deployment", "app", "web", DiffChange::Changed),
                object("ConfigMap", "app", "same", DiffChange::Unchanged),
                object("Namespace", "", "old", DiffChange::Pruned),
                object("ConfigMap", "other", "x", DiffChange::Failed),
            ],
            None,
        );
        assert_eq!(
            render(&v, None),
            "◎ g/manifests at feature 0123456789ab\n\
             ► ConfigMap/app/new created\n\
             ► Deployment/app/web drifted\n\
             --- a\n+++ b\n@@ -1 +1 @@\n-  replicas: 1\n+  replicas: 2\n\
             ► Namespace/old deleted\n\
             ✗ ConfigMap/other/x: forbidden (403 Forbidden)\n"
        );
    }

    #[test]
    fn text_output_says_no_changes_and_names_a_project_error() {
        let same = object("ConfigMap", "app", "same", DiffChange::Unchanged);
        assert_eq!(
            render(&view(vec![same], None), None),
            "◎ g/manifests at feature 0123456789ab\n✔ no changes\n"
        );
        let failed = render(
            &view(Vec::new(), Some("g/manifests has no branch nope")),
            None,
        );
        assert!(failed.contains("✗ g/manifests has no branch nope\n"));
        assert!(!failed.contains("no changes"));
    }

    /// A ref that resolved to no commit says so rather than leaving the commit blank.
    #[test]
    fn a_preview_without_a_commit_says_none_was_resolved() {
        let mut v = view(Vec::new(), Some("g/manifests has no branch nope"));
        v.projects[0].commit = None;
        assert!(
            render(&v, None).starts_with("◎ g/manifests at feature (no commit resolved)\n✗ "),
            "{}",
            render(&v, None)
        );
    }

    /// A preview that failed before looking the ref up (the agent's cluster unreadable, its
    /// tunnel saturated) says so, not that the ref resolved to no commit.
    #[test]
    fn a_preview_that_failed_before_resolving_the_ref_says_why_not_that_none_resolved() {
        let busy = "could not read the agent's cluster (…): all its tunnel streams are busy";
        let mut v = view(Vec::new(), Some(busy));
        v.projects[0].commit = None;
        v.projects[0].unresolved = Some("the agent's cluster could not be read first".into());
        let text = render(&v, None);
        assert!(
            text.starts_with(
                "◎ g/manifests at feature (ref not resolved: the agent's cluster could not be read first)\n✗ could not read the agent's cluster"
            ),
            "{text}"
        );
        assert!(!text.contains("no commit resolved"), "{text}");
    }
}
