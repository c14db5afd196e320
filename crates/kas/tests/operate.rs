//! The day-to-day loop against real kas, agentk, Git and the control plane: reconcile now (and
//! follow it, piped and in a real terminal), suspend and resume, delete an agent, list
//! personal access tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use support::gitops::{Rig, RigArgs, admin_rbac, configmap, get_json, rig_entry, rig_opts};
use support::{Agent, Kas, KasOptions, Pki, wait_for};
use tether_testenv::TestEnv;

/// Runs `kas ARGS` against `kas` (its configuration names the API and the admin token).
fn kas_cli(kas: &Kas, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kas"))
        .arg("--configuration-file")
        .arg(&kas.config)
        .args(args)
        .output()
        .unwrap()
}

/// `kas agent reconcile AGENT --wait --timeout TIMEOUT`.
fn reconcile_wait(kas: &Kas, agent: &str, timeout: &str) -> Output {
    let args = ["agent", "reconcile", agent, "--wait", "--timeout", timeout];
    kas_cli(kas, &args)
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn agent_name(rig: &Rig) -> String {
    format!("{}", rig.agent_id)
}

/// The value of ConfigMap `name` in `ns`.
fn value(env: &TestEnv, ns: &str, name: &str) -> String {
    let cm = get_json(env, &["get", "configmap", name, "-n", ns]).unwrap();
    cm["data"]["value"].as_str().unwrap().to_owned()
}

fn drift(env: &TestEnv, ns: &str, name: &str) {
    let patch = r#"{"data":{"value":"by hand"}}"#;
    let out = env
        .kubectl()
        .args([
            "patch",
            "configmap",
            name,
            "-n",
            ns,
            "--type=merge",
            "-p",
            patch,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(value(env, ns, name), "by hand");
}

async fn configmap_rig(prefix: &str) -> (Rig, String, String) {
    configmap_rig_with(prefix, "", &[], KasOptions::default()).await
}

/// A rig whose manifests hold one ConfigMap, synced; `config_extra` is appended to the agent's
/// `config.yaml`, `agent_args` to agentk's command line; kas polls Git every 300 ms.
async fn configmap_rig_with(
    prefix: &str,
    config_extra: &str,
    agent_args: &[&str],
    opts: KasOptions,
) -> (Rig, String, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace(prefix).unwrap();
    let args = RigArgs {
        env,
        agent_ns: ns.clone(),
        rbac: &admin_rbac(&ns),
        project_extra: config_extra,
        initial: &[("manifests/cm.yaml", Some(&configmap("app", &ns, "v1")))],
        agent_args,
    };
    let opts = KasOptions {
        git_poll: "300ms",
        ..opts
    };
    let (rig, c1) = rig_opts(args, opts).await;
    rig.synced(&c1).await;
    (rig, ns, c1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_after_a_hand_made_drift_restores_the_object_and_wait_exits_0() {
    let (rig, ns, c1) = configmap_rig("reconcile").await;
    drift(&rig.env, &ns, "app");
    // Piped: plain lines, no terminal escapes, exit code 0.
    let out = reconcile_wait(&rig.kas, &agent_name(&rig), "90s");
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        !stdout.contains('\x1b'),
        "escape codes when piped: {stdout:?}"
    );
    assert!(
        stdout.contains(&format!("group/manifests: fetched, commit {}", &c1[..12])),
        "{stdout}"
    );
    assert!(
        stdout.contains("succeeded: 1 applied, 1 Current, 0 not Current, 0 pruned"),
        "{stdout}"
    );
    assert_eq!(value(&rig.env, &ns, "app"), "v1", "the drift was corrected");
}

/// A reconcile the agent answered is not asked again of the streams it opens later (a new
/// leader, a restarted agentk): each new stream re-ran it (E12: once per leadership change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_reconcile_is_not_asked_again_of_a_restarted_agent() {
    let (mut rig, _ns, _c1) = configmap_rig("answered").await;
    let asked = |agent: &Agent| -> Vec<u64> {
        agent
            .log_lines()
            .iter()
            .filter(|l| l["msg"] == "kas asked for a synchronization now")
            .filter_map(|l| l["resync_id"].as_u64())
            .collect()
    };
    let out = reconcile_wait(&rig.kas, &agent_name(&rig), "90s");
    assert!(out.status.success(), "{}", text(&out));
    let first = asked(&rig.agent);
    assert_eq!(first.len(), 1, "{}", rig.agent.log());

    rig.agent.stop();
    let again = rig.start_agent("answered-again");
    again
        .wait_line("its first sync", |l| l["msg"] == "Synchronization done")
        .await;
    // A new reconcile: directives come in order on a stream, so the old one, had it been
    // sent, would be in the log before this one's.
    let out = reconcile_wait(&rig.kas, &agent_name(&rig), "90s");
    assert!(out.status.success(), "{}", text(&out));
    let second = asked(&again);
    assert_eq!(second.len(), 1, "{}", again.log());
    assert!(second[0] > first[0], "{second:?} after {first:?}");
}

/// The report answering a reconcile keeps, in short, the sync it replaced: a commit's sync that
/// pruned, replaced at once by the reconcile's re-sync (which finds nothing to prune), is still
/// told with its prunes. Before, only the last report was kept, and `reconcile --wait` omitted
/// the pruning sync when both ran between two of its polls (E4 M6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconciles_answer_keeps_the_pruning_sync_it_replaced_in_short() {
    let (rig, ns, _) = configmap_rig("earlier").await;
    let extra = configmap("extra", &ns, "v1");
    let c2 = rig
        .manifests
        .commit(&[("manifests/extra.yaml", Some(&extra))], "extra");
    rig.synced(&c2).await;
    let c3 = rig
        .manifests
        .commit(&[("manifests/extra.yaml", None)], "extra goes");
    let pruning = rig.synced(&c3).await;
    let pruned = |s: &kas::api::SyncView| {
        s.objects
            .iter()
            .filter(|o| o.status == kas::api::ReportedStatus::Pruned)
            .count()
    };
    assert_eq!(pruned(&pruning), 1, "{pruning:?}");

    let out = reconcile_wait(&rig.kas, &agent_name(&rig), "60s");
    assert!(out.status.success(), "{}", text(&out));
    let reports = rig.kas.admin.gitops_status(rig.agent_id).await.unwrap();
    let answer = &reports[0];
    assert!(answer.resync_id > 0, "{answer:?}");
    assert_eq!(pruned(answer), 0, "{answer:?}");
    let replaced = &answer.earlier[0];
    assert_eq!(
        (
            replaced.commit_id.as_str(),
            replaced.pruned,
            replaced.current
        ),
        (c3.as_str(), 1, 1),
        "{answer:?}"
    );
    assert_eq!(replaced.finished_at, pruning.finished_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_wait_on_a_failing_project_exits_non_zero_naming_the_object() {
    let (rig, ns, _) = configmap_rig("recfail").await;
    // Someone else's object: the agent must not take it over, so syncing it fails.
    let foreign = String::from_utf8(configmap("theirs", &ns, "original"))
        .unwrap()
        .replace(
            "metadata:\n",
            "metadata:\n  annotations:\n    config.k8s.io/owning-inventory: someone-else\n",
        );
    rig.env.apply_yaml(&foreign).unwrap();
    let c2 = rig.manifests.commit(
        &[(
            "manifests/theirs.yaml",
            Some(&configmap("theirs", &ns, "ours")),
        )],
        "take theirs",
    );
    rig.synced(&c2).await;
    let out = reconcile_wait(&rig.kas, "group/config:seed", "90s");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        stdout.contains("failed: 1 applied, 1 Current, 1 not Current, 0 pruned, 1 not applied"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("ConfigMap/{ns}/theirs Failed")),
        "{stdout}"
    );
}

/// A Deployment never Available: no node has the label it selects. It stays InProgress until
/// `reconcile_timeout`.
fn stuck_deployment(ns: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: stuck\n  namespace: {ns}\nspec:\n  replicas: 1\n  selector:\n    matchLabels:\n      app: stuck\n  template:\n    metadata:\n      labels:\n        app: stuck\n    spec:\n      nodeSelector:\n        tether.test/none: none\n      containers:\n      - name: c\n        image: nginx\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_wait_shows_progress_while_an_object_is_not_current_yet() {
    let timeout = "    reconcile_timeout: 4s\n";
    let opts = KasOptions::default();
    let (rig, ns, _) = configmap_rig_with("recprog", timeout, &[], opts).await;
    let stuck = stuck_deployment(&ns);
    let c2 = rig
        .manifests
        .commit(&[("manifests/stuck.yaml", Some(stuck.as_bytes()))], "stuck");
    rig.synced(&c2).await;
    let args = ["agent", "reconcile", "group/config:seed", "--wait"];
    let out = kas_cli(&rig.kas, &args);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let during = format!(
        "group/manifests: synchronizing commit {}: 2 object(s) so far",
        &c2[..12]
    );
    assert!(
        stdout.contains(&during),
        "no progress while waiting: {stdout}"
    );
    let waits = format!("; not Current yet: Deployment/{ns}/stuck InProgress: ");
    assert!(stdout.contains(&waits), "{stdout}");
    assert!(
        stdout.contains(&format!("Deployment/{ns}/stuck InProgress")),
        "{stdout}"
    );
}

/// `reconcile --wait` that times out names the object the sync was still waiting for (it
/// said only how many objects were Current): the user knows what to look at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_wait_that_times_out_names_the_object_not_current_yet() {
    let timeout = "    reconcile_timeout: 10m\n";
    let opts = KasOptions::default();
    let (rig, ns, _) = configmap_rig_with("rectime", timeout, &[], opts).await;
    let c2 = rig.manifests.commit(
        &[(
            "manifests/stuck.yaml",
            Some(stuck_deployment(&ns).as_bytes()),
        )],
        "stuck",
    );
    wait_for(
        "the stuck commit's sync under way",
        Duration::from_secs(60),
        || async {
            let p = rig.kas.admin.gitops_progress(rig.agent_id).await.ok()?;
            p.iter().any(|p| p.commit_id == c2).then_some(())
        },
    )
    .await;
    let out = reconcile_wait(&rig.kas, "group/config:seed", "6s");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let last = stdout
        .lines()
        .find(|l| l.starts_with("    last heard: "))
        .unwrap_or_else(|| panic!("no progress at the timeout: {stdout}"));
    let commit = format!("group/manifests: synchronizing commit {}: ", &c2[..12]);
    let waits = format!("; not Current yet: Deployment/{ns}/stuck InProgress: ");
    assert!(last.contains(&commit) && last.contains(&waits), "{stdout}");
}

/// A tmux session of its own, killed (by its unique name) when the test ends.
struct Tmux {
    name: String,
}

impl Tmux {
    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux").args(args).output().unwrap()
    }

    fn start(name: String, width: u16) -> Tmux {
        let t = Tmux { name };
        let w = width.to_string();
        let out = t.tmux(&[
            "new-session",
            "-d",
            "-s",
            &t.name,
            "-x",
            &w,
            "-y",
            "40",
            "sh",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        t
    }

    fn screen(&self) -> String {
        String::from_utf8(self.tmux(&["capture-pane", "-p", "-t", &self.name]).stdout).unwrap()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-session", "-t", &self.name]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_wait_draws_a_progress_bar_in_a_real_terminal() {
    let (rig, ns, _) = configmap_rig("rectty").await;
    drift(&rig.env, &ns, "app");
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("terminal.raw");
    let tmux = Tmux::start(format!("tether-operate-{}", std::process::id()), 160);
    // Everything the command writes to the terminal, escapes included.
    let pipe = format!("cat >> {}", raw.display());
    assert!(
        tmux.tmux(&["pipe-pane", "-o", "-t", &tmux.name, &pipe])
            .status
            .success()
    );
    let command = format!(
        "{} --configuration-file {} agent reconcile {} --wait --timeout 90s; echo EXIT=$?",
        env!("CARGO_BIN_EXE_kas"),
        rig.kas.config.display(),
        rig.agent_id
    );
    tmux.tmux(&["send-keys", "-t", &tmux.name, &command, "Enter"]);
    let screen = wait_for(
        "the command to end in tmux",
        Duration::from_secs(120),
        || async {
            let s = tmux.screen();
            // The line the shell prints, not the command line echoing it.
            s.lines().any(|l| l.starts_with("EXIT=")).then_some(s)
        },
    )
    .await;
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(screen.contains("1 applied, 1 Current"), "{screen}");
    let raw = String::from_utf8_lossy(&std::fs::read(&raw).unwrap()).into_owned();
    assert!(
        raw.contains("synchronized"),
        "no progress bar drawn: {raw:?}"
    );
    assert!(raw.contains("\x1b["), "no terminal control in {raw:?}");
    assert_eq!(value(&rig.env, &ns, "app"), "v1");
}

/// Waits until agentk's log has `msg`.
async fn agent_logged(agent: &Agent, what: &str, msg: &str) {
    let probe = || async { agent.log().contains(msg).then_some(()) };
    wait_for(what, Duration::from_secs(30), probe).await;
}

/// How many times kas logged that a stream holds commits of a suspended project.
fn holds(kas: &Kas) -> usize {
    kas.log()
        .matches("GitOps suspended: holding new commits")
        .count()
}

/// An entry added to the configuration while the agent is suspended gets no report:
/// `kas agent status` says it is suspended, why, and the command that resumes it (it said
/// "pending", as if a sync were on its way), and exits 0 (a deliberate state, not a failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_added_while_the_agent_is_suspended_shows_suspended_not_pending() {
    let (rig, ns, _) = configmap_rig_with("held", "", &[], KasOptions::default()).await;
    let suspend = [
        "agent",
        "suspend",
        "group/config:seed",
        "--reason",
        "incident 7",
    ];
    let out = kas_cli(&rig.kas, &suspend);
    assert!(out.status.success(), "{}", text(&out));
    agent_logged(&rig.agent, "the suspension", "GitOps suspended by kas").await;
    rig.kas
        .set_projects(&[("group/second", &rig.manifests)])
        .await;
    let entries = format!(
        "gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {ns}\n  - id: group/second\n    default_namespace: {ns}\n"
    );
    let config = ".gitlab/agents/seed/config.yaml";
    rig.config
        .commit(&[(config, Some(entries.as_bytes()))], "a second entry");
    let status = || {
        kas_cli(
            &rig.kas,
            &["agent", "status", "group/config:seed", "-o", "json"],
        )
    };
    let (out, row) = wait_for(
        "the new entry among those without a report",
        Duration::from_secs(30),
        || async {
            let out = status();
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let rows = json["unreported"].as_array()?.clone();
            let row = rows
                .into_iter()
                .find(|r| r["project_id"] == "group/second")?;
            Some((out, row))
        },
    )
    .await;
    assert_eq!(row["state"], "suspended", "{row}");
    let reason = row["reason"].as_str().unwrap();
    assert!(
        reason.contains("incident 7") && reason.contains("kas agent resume"),
        "{reason}"
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_holds_through_a_commit_a_drift_and_restarts_and_resume_applies() {
    // Drift is corrected every second unless suspended.
    let (mut rig, ns, c1) = configmap_rig_with(
        "suspend",
        "",
        &["--gitops-resync-interval", "1s"],
        KasOptions::default(),
    )
    .await;
    let out = kas_cli(
        &rig.kas,
        &[
            "agent",
            "suspend",
            "group/config:seed",
            "--reason",
            "incident 42",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    agent_logged(
        &rig.agent,
        "agentk to hear of the suspension",
        "GitOps suspended by kas",
    )
    .await;
    let c2 = rig.manifests.commit(
        &[("manifests/cm.yaml", Some(&configmap("app", &ns, "v2")))],
        "v2",
    );
    drift(&rig.env, &ns, "app");
    // Reconcile is refused, not reported as done.
    let out = kas_cli(
        &rig.kas,
        &["agent", "reconcile", "group/config:seed", "--wait"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("is suspended (by admin"),
        "{}",
        text(&out)
    );

    // After a kas restart the new stream reads the suspension back before it would offer c2
    // (fetched by then: the mirror on disk has it) ...
    let before = holds(&rig.kas);
    rig.kas.restart().await;
    rig.kas.wait_connected(rig.agent_id).await;
    wait_for(
        "the new stream to hold commits",
        Duration::from_secs(30),
        || async { (holds(&rig.kas) > before).then_some(()) },
    )
    .await;
    // ... and a new agentk hears of it before anything else.
    rig.agent.stop();
    rig.agent = rig.start_agent("seed-restarted");
    agent_logged(
        &rig.agent,
        "the new agentk to hear of the suspension",
        "GitOps suspended by kas",
    )
    .await;
    let status = kas_cli(&rig.kas, &["agent", "status", "group/config:seed"]);
    let status = String::from_utf8(status.stdout).unwrap();
    assert!(
        status.contains("SUSPENDED (every manifest project) by admin"),
        "{status}"
    );
    assert!(status.contains(": incident 42"), "{status}");
    let listed = kas_cli(&rig.kas, &["agent", "list", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["suspensions"][0]["reason"], "incident 42");
    assert_eq!(
        value(&rig.env, &ns, "app"),
        "by hand",
        "drift corrected while suspended"
    );
    let syncs = rig.kas.admin.gitops_status(rig.agent_id).await.unwrap();
    let synced: Vec<&str> = syncs.iter().map(|s| s.commit_id.as_str()).collect();
    assert_eq!(
        synced,
        [c1.as_str()],
        "a commit was applied while suspended"
    );
    // kas says the entry is held (a newer commit waiting there is no stall).
    assert!(syncs.iter().all(|s| s.suspended), "{syncs:?}");

    let out = kas_cli(&rig.kas, &["agent", "resume", "group/config:seed"]);
    assert!(out.status.success(), "{}", text(&out));
    let resumed = rig.synced(&c2).await;
    assert!(!resumed.suspended, "{resumed:?}");
    assert_eq!(value(&rig.env, &ns, "app"), "v2");
    let listed = kas_cli(&rig.kas, &["agent", "list", "-o", "yaml"]);
    let listed: serde_json::Value = serde_saphyr::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["suspensions"], serde_json::json!([]));
}

/// A token of another agent put in the token file (a Secret updated with the wrong agent's
/// token, or an agent deleted and registered again without restarting agentk): agentk must not
/// go on as the first agent under the other's name (its Lease and inventories are the first
/// agent's; its reports were shown as the other's, whose objects then failed at the next
/// restart). It says so and exits non-zero, so that its Pod starts again as the other agent;
/// nothing of the first agent's is pruned meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_another_agent_in_the_token_file_makes_agentk_exit_to_start_again_as_it() {
    let (mut rig, ns, _c1) = configmap_rig("otheragent").await;
    let other = rig.kas.admin.register_agent("group/config", "other").await;
    let other = other.unwrap();
    let config = ".gitlab/agents/other/config.yaml";
    rig.config
        .commit(&[(config, Some(b"ci_access: {}\n".as_slice()))], "other");
    let token_file = rig._dir.path().join("seed.token");
    std::fs::write(&token_file, format!("{}\n", other.token)).unwrap();
    let said = "The agent token file now holds a token of another agent";
    agent_logged(&rig.agent, "agentk to see the other agent", said).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !rig.agent.exited() {
        assert!(
            std::time::Instant::now() < deadline,
            "agentk did not exit: {}",
            rig.agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = rig.agent.log();
    assert!(
        log.contains("agentk: the agent token file now holds a token of another agent"),
        "{log}"
    );
    // Nothing ran as the other agent (its id is only in the line saying why agentk stops).
    let as_other = format!("\"agent_id\":{}", other.agent_id);
    assert!(!log.contains(&as_other), "{log}");
    assert_eq!(
        value(&rig.env, &ns, "app"),
        "v1",
        "the first agent's object"
    );
}

/// A suspension names its project by path; the configuration may name the same project by its
/// numeric id. kas matches them by the project: the entry is held (a commit there waits), kas
/// says it is `suspended` (so a newer commit waiting is no stall), and resuming applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspension_by_path_holds_an_entry_written_as_a_numeric_id() {
    let (rig, ns, _) = configmap_rig_with("numeric", "", &[], KasOptions::default()).await;
    let projects = rig.kas.admin.list_projects().await.unwrap();
    let id = projects
        .iter()
        .find(|p| p.path == "group/manifests")
        .map(|p| p.id)
        .unwrap();
    let entries = format!(
        "gitops:\n  manifest_projects:\n  - id: {id}\n    default_namespace: {ns}\n    paths:\n    - glob: '/numeric/*.yaml'\n"
    );
    // Objects of their own: the entry by path owns the others (inventories are per entry as
    // written).
    let m1 = rig.manifests.commit(
        &[("numeric/cm.yaml", Some(&configmap("num", &ns, "v1")))],
        "num",
    );
    let config = ".gitlab/agents/seed/config.yaml";
    rig.config
        .commit(&[(config, Some(entries.as_bytes()))], "the entry by its id");
    let numeric = id.to_string();
    assert!(!rig.synced_in(&numeric, &m1).await.suspended);

    let before = holds(&rig.kas);
    let suspend = [
        "agent",
        "suspend",
        "group/config:seed",
        "--project",
        "group/manifests",
    ];
    let out = kas_cli(&rig.kas, &suspend);
    assert!(out.status.success(), "{}", text(&out));
    let c2 = rig.manifests.commit(
        &[("numeric/cm.yaml", Some(&configmap("num", &ns, "v2")))],
        "v2",
    );
    wait_for(
        "kas to hold the entry's commits",
        Duration::from_secs(30),
        || async { (holds(&rig.kas) > before).then_some(()) },
    )
    .await;
    let held = rig
        .report("the entry held", |s| s.project_id == numeric && s.suspended)
        .await;
    assert_eq!(held.commit_id, m1, "{held:?}");
    assert_eq!(value(&rig.env, &ns, "num"), "v1", "applied while suspended");

    let out = kas_cli(&rig.kas, &["agent", "resume", "group/config:seed"]);
    assert!(out.status.success(), "{}", text(&out));
    let resumed = rig.synced_in(&numeric, &c2).await;
    assert!(!resumed.suspended, "{resumed:?}");
    assert_eq!(value(&rig.env, &ns, "num"), "v2");
}

/// One project suspended during an incident does not block a reconcile of the whole agent: the
/// others synchronize and `--wait` exits 0, the suspended one is named as skipped (with who
/// and why) and keeps its old commit. Before, kas refused the whole reconcile (409, exit 1).
/// A reconcile naming the suspended project is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_agent_reconcile_skips_a_suspended_project_and_syncs_the_others() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("skip").unwrap();
    let other = format!(
        "  - id: group/other\n    default_namespace: {ns}\n    paths:\n    - glob: '/other/*.yaml'\n"
    );
    let (main_v1, other_v1) = (configmap("app", &ns, "v1"), configmap("other", &ns, "v1"));
    let args = RigArgs {
        env,
        agent_ns: ns.clone(),
        rbac: &admin_rbac(&ns),
        project_extra: &other,
        initial: &[
            ("manifests/cm.yaml", Some(&main_v1)),
            ("other/cm.yaml", Some(&other_v1)),
        ],
        agent_args: &[],
    };
    let opts = KasOptions {
        git_poll: "300ms",
        ..KasOptions::default()
    };
    let (rig, c1) = rig_opts(args, opts).await;
    rig.kas
        .set_projects(&[("group/other", &rig.manifests)])
        .await;
    rig.synced_in("group/manifests", &c1).await;
    rig.synced_in("group/other", &c1).await;
    let suspend = [
        "agent",
        "suspend",
        "group/config:seed",
        "--project",
        "group/other",
        "--reason",
        "incident 9",
    ];
    let out = kas_cli(&rig.kas, &suspend);
    assert!(out.status.success(), "{}", text(&out));
    agent_logged(&rig.agent, "the suspension", "GitOps suspended by kas").await;
    let (main_v2, other_v2) = (configmap("app", &ns, "v2"), configmap("other", &ns, "v2"));
    rig.manifests.commit(
        &[
            ("manifests/cm.yaml", Some(&main_v2)),
            ("other/cm.yaml", Some(&other_v2)),
        ],
        "v2 of both",
    );

    let out = reconcile_wait(&rig.kas, "group/config:seed", "60s");
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("group/other: suspended (by admin, reason: incident 9): skipped"),
        "{said}"
    );
    assert_eq!(value(&rig.env, &ns, "app"), "v2");
    assert_eq!(
        value(&rig.env, &ns, "other"),
        "v1",
        "a suspended project synced"
    );

    let named = [
        "agent",
        "reconcile",
        "group/config:seed",
        "--project",
        "group/other",
    ];
    let out = kas_cli(&rig.kas, &named);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("group/other is suspended (by admin, reason: incident 9)"),
        "{}",
        text(&out)
    );
}

/// Suspensions hold a whole project: suspending one named entry of a project with two says
/// that both are held (it said only "suspended for group/manifests", and the other entry's
/// changes then stopped without a word).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspending_one_entry_says_every_entry_of_its_project_is_held() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("entries").unwrap();
    let second = format!(
        "  - id: group/manifests\n    name: b\n    default_namespace: {ns}\n    paths:\n    - glob: '/other/*.yaml'\n"
    );
    let (a, b) = (configmap("a", &ns, "v1"), configmap("b", &ns, "v1"));
    let args = RigArgs {
        env,
        agent_ns: ns.clone(),
        rbac: &admin_rbac(&ns),
        project_extra: &second,
        initial: &[("manifests/a.yaml", Some(&a)), ("other/b.yaml", Some(&b))],
        agent_args: &[],
    };
    let entry = "    name: a\n    paths:\n    - glob: '/manifests/*.yaml'\n";
    let (rig, c1) = rig_entry(args, entry, KasOptions::default()).await;
    rig.synced_in("group/manifests#a", &c1).await;
    rig.synced_in("group/manifests#b", &c1).await;
    let suspend = [
        "agent",
        "suspend",
        "group/config:seed",
        "--project",
        "group/manifests#a",
    ];
    let out = kas_cli(&rig.kas, &suspend);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("every entry of it is held (group/manifests#a, group/manifests#b)"),
        "{}",
        text(&out)
    );
}

/// An agentk restarted while kas refuses the head commit (unsigned, with only signed commits
/// allowed) has no commit it may apply. `kas agent reconcile --wait` is answered at once with
/// the refusal; before, the worker woke again and again on a sync it could not start (one core
/// spinning) and never answered, so the command timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_wait_without_a_commit_to_apply_is_answered_with_the_refusal() {
    let (mut rig, ns, _) = configmap_rig("norecommit").await;
    rig.agent.stop();
    let keys = tempfile::tempdir().unwrap();
    let signer =
        tether_testenv::signing::Signer::ssh(keys.path(), "trusted", "ops@example.com").unwrap();
    let trust = signer.write_trust(keys.path(), "allowed_signers").unwrap();
    rig.set_manifests_project(kas::api::ProjectRequest {
        verify_allowed_signers_file: Some(trust.display().to_string()),
        ..kas::api::ProjectRequest::default()
    })
    .await;
    let c2 = rig.manifests.commit(
        &[("manifests/cm.yaml", Some(&configmap("app", &ns, "v2")))],
        "unsigned",
    );
    rig.agent = rig.start_agent("seed-restarted");
    let refused = rig.synced(&c2).await;
    assert!(!refused.error.is_empty(), "{refused:?}");

    let out = reconcile_wait(&rig.kas, "group/config:seed", "30s");
    // 1: the project failed, with kas's reason; not 3, no answer within the timeout.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        stdout.contains(&format!("commit {} failed", &c2[..12])),
        "{stdout}"
    );
    assert!(stdout.contains(&refused.error), "{stdout}");
    assert_eq!(value(&rig.env, &ns, "app"), "v1", "nothing applied");
}

/// A Git remote kas cannot reach: `kas agent reconcile --wait` names the project and why and
/// exits 5, even though the agent re-synchronized the last good commit well. Before, it said
/// "fetch failed" in passing and exited 0, so a CI "push, then reconcile --wait" step passed
/// while the pushed commit was never fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_with_an_unreachable_remote_exits_5_naming_the_project() {
    let (rig, _ns, c1) = configmap_rig("recunreach").await;
    let gone = rig.manifests.dir.with_extension("gone");
    std::fs::rename(&rig.manifests.dir, &gone).unwrap();
    let out = reconcile_wait(&rig.kas, "group/config:seed", "90s");
    std::fs::rename(&gone, &rig.manifests.dir).unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        stdout.contains("group/manifests: fetch failed (")
            && stdout.contains(&format!(
                "the newest commit was not fetched, syncing the last good commit {}",
                &c1[..12]
            )),
        "{stdout}"
    );
    assert!(!stdout.contains("fetched, commit"), "{stdout}");
}

/// A project kas never fetched (its remote replaced by one that fails): the agent has no
/// commit to synchronize, so `reconcile --wait` says so and exits 5 at once (it waited out
/// its whole `--timeout` for a report that could not come, then said it timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_wait_of_a_project_never_fetched_exits_5_without_waiting() {
    let opts = KasOptions::default();
    let (rig, _ns, _c1) = configmap_rig_with("recnever", "  - id: group/never\n", &[], opts).await;
    let not_a_repository = rig.manifests.dir.with_extension("empty");
    std::fs::create_dir_all(&not_a_repository).unwrap();
    rig.kas
        .admin
        .set_project(&kas::api::ProjectRequest {
            path: "group/never".into(),
            remote: Some(not_a_repository.display().to_string()),
            ..kas::api::ProjectRequest::default()
        })
        .await
        .unwrap();
    // Once the agent has the project's stream (what `--wait` waited on for nothing).
    let asked = tether_kas_api::ReconcileRequest {
        project: Some("group/never".into()),
        wait_ms: None,
    };
    wait_for(
        "the agent's stream of group/never",
        Duration::from_secs(60),
        || async {
            let started = rig.kas.admin.reconcile(rig.agent_id, &asked).await.ok()?;
            (started.projects.first()?.streams > 0).then_some(())
        },
    )
    .await;
    let args = [
        "agent",
        "reconcile",
        "group/config:seed",
        "--project",
        "group/never",
        "--wait",
        "--timeout",
        "600s",
    ];
    let out = kas_cli(&rig.kas, &args);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("group/never: fetch failed (")
            && all.contains("no commit of it was ever fetched, so there is nothing to synchronize"),
        "{all}"
    );
    assert!(!all.contains("timed out"), "{all}");
}

/// A Git host that accepts connections and never answers: `reconcile --wait` ends once the
/// fetch times out (`git.fetch_timeout`), exit 5 naming the project and the timeout, and the
/// last good commit stays in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_with_a_silent_remote_exits_5_once_the_fetch_times_out() {
    let opts = KasOptions {
        git_extra: "  fetch_timeout: 2s\n",
        ..KasOptions::default()
    };
    let (rig, _ns, c1) = configmap_rig_with("recsilent", "", &[], opts).await;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    rig.kas
        .admin
        .set_project(&kas::api::ProjectRequest {
            path: "group/manifests".into(),
            remote: Some(format!("git://127.0.0.1:{port}/manifests")),
            ..kas::api::ProjectRequest::default()
        })
        .await
        .unwrap();
    let out = reconcile_wait(&rig.kas, "group/config:seed", "90s");
    assert_eq!(out.status.code(), Some(5), "{}", text(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(
        stdout.contains("group/manifests: fetch failed (")
            && stdout.contains("no answer within")
            && stdout.contains(&format!("syncing the last good commit {}", &c1[..12])),
        "{stdout}"
    );
    drop(silent);
}

/// The branch an entry follows is deleted: the agent hears it once, not at every fetch (every
/// poll used to send the error again: a new failure report each time, and a notification flip
/// against each drift re-sync of the last good commit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_branch_is_reported_once_not_at_every_fetch() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let env = TestEnv::from_env().expect("a running control plane");
    let ns = env.create_namespace("gonebranch").unwrap();
    let args = RigArgs {
        env,
        agent_ns: ns.clone(),
        rbac: &admin_rbac(&ns),
        project_extra: "",
        initial: &[("manifests/cm.yaml", Some(&configmap("app", &ns, "v1")))],
        agent_args: &[],
    };
    let entry = "    ref:\n      branch: main\n    paths:\n    - glob: '/manifests/*.yaml'\n";
    let opts = KasOptions {
        git_poll: "300ms",
        ..KasOptions::default()
    };
    let (rig, c1) = rig_entry(args, entry, opts).await;
    rig.synced(&c1).await;
    rig.manifests.git(&["checkout", "-q", "-b", "elsewhere"]);
    rig.manifests.git(&["branch", "-q", "-D", "main"]);
    rig.wait_fetches(10).await;
    let failed: Vec<_> = rig
        .agent
        .log_lines()
        .into_iter()
        .filter(|l| l["msg"] == "Synchronization failed")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(
        failed[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("branch main of group/manifests: ")),
        "named as people name it (it read `ref Branch(\"main\")`): {failed:?}"
    );
}

fn pat_request() -> kas::api::UserTokenRequest {
    kas::api::UserTokenRequest {
        username: "alice".into(),
        memberships: vec!["project:group/app:developer".parse().unwrap()],
        expires_in_seconds: Some(3600),
    }
}

/// kubectl through kas's proxy (TLS: kubectl sends tokens over TLS only) with a personal
/// access token for the agent.
fn kubectl_via_kas(rig: &Rig, pki: &Pki, token: &str, args: &[&str]) -> Output {
    kubectl_via_kas_to(rig, pki, rig.agent_id, token, args)
}

/// [`kubectl_via_kas`] to agent `agent_id`.
fn kubectl_via_kas_to(rig: &Rig, pki: &Pki, agent_id: i64, token: &str, args: &[&str]) -> Output {
    Command::new(rig.env.bin_dir.join("kubectl"))
        .args([
            "--kubeconfig=/dev/null",
            &format!("--server=https://localhost:{}", rig.kas.k8s_port),
            &format!("--certificate-authority={}", pki.ca.display()),
            &format!("--token=pat:{agent_id}:{token}"),
        ])
        .args(args)
        .output()
        .unwrap()
}

/// The rig of the deletion tests: people of `group/app` may use the seed's `user_access`
/// (as the agent's ServiceAccount), through the proxy over TLS.
async fn user_access_rig(prefix: &str) -> (Rig, String, Pki) {
    let users = "user_access:\n  access_as:\n    agent: {}\n  projects:\n  - id: group/app\n";
    let pki = Pki::temporary();
    let tls = KasOptions {
        k8s_tls: Some((pki.cert.clone(), pki.key.clone())),
        ..KasOptions::default()
    };
    let (rig, ns, _) = configmap_rig_with(prefix, users, &[], tls).await;
    (rig, ns, pki)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_ends_the_agents_tunnel_at_once_and_removes_it_and_its_tokens() {
    let (rig, ns, pki) = user_access_rig("delete").await;
    let kas = &rig.kas;
    let keep = kas.admin.register_agent("group/app", "kept").await.unwrap();
    let pat = kas
        .admin
        .create_user_token(rig.agent_id, &pat_request())
        .await
        .unwrap();
    kas.admin
        .create_user_token(keep.agent_id, &pat_request())
        .await
        .unwrap();

    // Listed without the secret, in every format.
    let listed = kas_cli(kas, &["user-token", "list", "--agent", "group/config:seed"]);
    let table = String::from_utf8(listed.stdout).unwrap();
    assert!(
        table.contains("alice") && table.contains("project:group/app:developer"),
        "{table}"
    );
    let json = kas_cli(kas, &["user-token", "list", "-o", "json"]);
    assert!(!String::from_utf8_lossy(&json.stdout).contains(&pat.token));
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    assert!(json[0].get("token").is_none(), "{json}");
    // The state is kas's judgement, not the CLI's clock's: a CLI two days ahead (the token
    // lasts an hour) still lists it active, as kas accepts it (E14 F5).
    let ahead = Command::new(env!("CARGO_BIN_EXE_kas"))
        .arg("--configuration-file")
        .arg(&kas.config)
        .args(["user-token", "list", "--agent", "group/config:seed"])
        .envs(support::faketime("+2d"))
        .output()
        .unwrap();
    let table = String::from_utf8(ahead.stdout).unwrap();
    assert!(
        table.contains(" active ") && !table.contains("expired"),
        "{table}"
    );

    let get = ["get", "configmap", "app", "-n", &ns];
    let before = kubectl_via_kas(&rig, &pki, &pat.token, &get);
    assert!(before.status.success(), "{}", text(&before));
    let out = kas_cli(kas, &["agent", "delete", "group/config:seed"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("1 token(s) revoked"), "{}", text(&out));
    // At once: kas no longer lists it, and nothing goes through its tunnel.
    let agents = kas.admin.list_agents().await.unwrap();
    assert_eq!(
        agents.iter().map(|a| a.id).collect::<Vec<_>>(),
        [keep.agent_id]
    );
    let after = kubectl_via_kas(&rig, &pki, &pat.token, &get);
    assert!(!after.status.success(), "{}", text(&after));
    let ping = kas_cli(kas, &["agent", "ping", &rig.agent_id.to_string()]);
    assert!(!ping.status.success(), "{}", text(&ping));
    agent_logged(
        &rig.agent,
        "agentk to be refused",
        "kas refused the agent token",
    )
    .await;
    let left = kas.admin.list_user_tokens(None).await.unwrap();
    assert_eq!(
        left.iter().map(|u| u.agent_id).collect::<Vec<_>>(),
        [keep.agent_id]
    );
    let again = kas_cli(kas, &["agent", "delete", &rig.agent_id.to_string()]);
    assert!(
        !again.status.success(),
        "deleting twice is an error: {}",
        text(&again)
    );
}

/// A deleted agent's id and configuration are not passed to the next agent registered. SQLite
/// gave the deleted (newest) agent's id to the next one and kas kept the deleted agent's
/// configuration in memory, so a person the deleted agent's `user_access` allowed reached the
/// cluster through the new agent, whose own configuration kas refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_agents_id_and_configuration_do_not_pass_to_the_next_agent() {
    let (rig, ns, pki) = user_access_rig("reuse").await;
    let kas = &rig.kas;
    let out = kas_cli(kas, &["agent", "delete", "group/config:seed"]);
    assert!(out.status.success(), "{}", text(&out));
    let gone = kas_cli(kas, &["agent", "status", &rig.agent_id.to_string()]);
    let no_agent = format!("no agent {}", rig.agent_id);
    assert!(
        !gone.status.success() && text(&gone).contains(&no_agent),
        "{}",
        text(&gone)
    );

    // The next agent's configuration is refused, so kas must know none for it. Fetched before
    // the agent connects: a configuration it got first would hide the deleted one's.
    let refused = b"user_access: [not, a, mapping]\n";
    let file = ".gitlab/agents/next/config.yaml";
    let commit = rig.config.commit(&[(file, Some(refused))], "refused");
    wait_for(
        "kas to fetch the refused configuration",
        Duration::from_secs(30),
        || async {
            let projects = kas.admin.list_projects().await.unwrap();
            let config = projects.into_iter().find(|p| p.path == "group/config")?;
            (config.commit.as_deref() == Some(commit.as_str())).then_some(())
        },
    )
    .await;
    let next = kas
        .admin
        .register_agent("group/config", "next")
        .await
        .unwrap();
    assert!(
        next.agent_id > rig.agent_id,
        "agent id {} given again",
        next.agent_id
    );
    let args: Vec<&str> = rig.agent_args.iter().map(String::as_str).collect();
    let url = kas.url("grpc");
    let _next = Agent::start_with(rig._dir.path(), "next", &url, &next.token, None, &args);
    kas.wait_connected(next.agent_id).await;
    wait_for(
        "kas to refuse the next agent's configuration",
        Duration::from_secs(30),
        || async {
            let config = kas.agent(next.agent_id).await.config?;
            config.error.is_some().then_some(config)
        },
    )
    .await;

    let pat = kas
        .admin
        .create_user_token(next.agent_id, &pat_request())
        .await
        .unwrap();
    // One request (no discovery), so kas's answer is what kubectl prints.
    let path = format!("/api/v1/namespaces/{ns}/configmaps/app");
    let out = kubectl_via_kas_to(
        &rig,
        &pki,
        next.agent_id,
        &pat.token,
        &["get", "--raw", &path],
    );
    let let_in = "let in by the deleted agent's user_access";
    assert!(!out.status.success(), "{let_in}: {}", text(&out));
    assert!(
        text(&out).contains("has no configuration in force"),
        "{}",
        text(&out)
    );
}

/// Every listing and status parses as JSON and YAML, and `--json` still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listing_parses_in_each_output_format() {
    let dir = tempfile::tempdir().unwrap();
    let kas = Kas::start(&dir.path().join("kas"), KasOptions::default()).await;
    let long = "a/very/long/group/path/with/many/subgroups/that/goes/on/and/on/project";
    let t = kas.admin.register_agent(long, "agent").await.unwrap();
    kas.admin
        .create_user_token(t.agent_id, &pat_request())
        .await
        .unwrap();
    let id = t.agent_id.to_string();
    let listings: [&[&str]; 5] = [
        &["agent", "list"],
        &["agent", "status", &id],
        &["project", "list"],
        &["token", "list", "--agent", &id],
        &["user-token", "list"],
    ];
    for args in listings {
        for format in ["json", "yaml"] {
            let out = kas_cli(&kas, &[args, &["-o", format]].concat());
            assert!(out.status.success(), "{args:?} {format}: {}", text(&out));
            let parsed: Result<serde_json::Value, String> = match format {
                "json" => serde_json::from_slice(&out.stdout).map_err(|e| e.to_string()),
                _ => serde_saphyr::from_slice(&out.stdout).map_err(|e| e.to_string()),
            };
            // A listing is an array; a status one object (the agent's state and its syncs).
            let parsed = parsed.unwrap();
            let shape = if args[1] == "status" {
                parsed["syncs"].is_array()
            } else {
                parsed.is_array()
            };
            assert!(shape, "{args:?} -o {format}: {}", text(&out));
        }
        let old = kas_cli(&kas, &[args, &["--json"]].concat());
        let new = kas_cli(&kas, &[args, &["-o", "json"]].concat());
        assert_eq!(old.stdout, new.stdout, "{args:?}");
    }
    let table = String::from_utf8(kas_cli(&kas, &["agent", "list"]).stdout).unwrap();
    assert!(table.contains(&format!("{long}:agent  offline")), "{table}");
}

#[test]
fn man_pages_are_written_for_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["man", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let page = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
    // Every subcommand `kas --help` lists, and theirs, has a page.
    let mut missing = Vec::new();
    for (parent, help) in [("kas", help(&[])), ("kas-agent", help(&["agent"]))] {
        for sub in subcommands(&help) {
            let name = format!("{parent}-{sub}.1");
            if !page(&name).contains(".TH") {
                missing.push(name);
            }
        }
    }
    assert!(missing.is_empty(), "no page for {missing:?}");
    assert!(page("kas-agent-reconcile.1").contains("Exit codes"));
    assert!(page("kas.1").contains(".TH"));
}

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommand names in a `--help` text (its "Commands:" section), `help` aside.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| *w != "help")
        .map(str::to_owned)
        .collect()
}

/// kas tells `kas agent reconcile --wait` whether the commit the agent reported was pushed
/// after the fetched one, on top of it (then the fetched commit is applied too, and the wait
/// ends well): only for a descendant, not for the same, an older or an unknown commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_pushed_on_top_of_the_fetched_one_supersedes_it() {
    let (rig, ns, c1) = configmap_rig("supersedes").await;
    let c2 = rig.manifests.commit(
        &[("manifests/cm.yaml", Some(&configmap("app", &ns, "v2")))],
        "v2",
    );
    rig.synced(&c2).await;
    let ask = |fetched: &str, reported: &str| {
        let req = kas::api::SupersedesRequest {
            project: "group/manifests".into(),
            fetched: fetched.into(),
            reported: reported.into(),
        };
        let admin = &rig.kas.admin;
        async move { admin.supersedes(rig.agent_id, &req).await }
    };
    assert!(ask(&c1, &c2).await.unwrap(), "c2 was pushed on top of c1");
    assert!(!ask(&c2, &c1).await.unwrap(), "c1 is older");
    assert!(!ask(&c2, &c2).await.unwrap(), "the same commit");
    let unknown = "0123456789abcdef0123456789abcdef01234567";
    assert!(!ask(&c1, unknown).await.unwrap());
    assert!(ask(&c1, "not-a-commit").await.is_err());
}

/// The lines a child process writes to one of its pipes, gathered as they come.
struct Gathered {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Gathered {
    fn start(pipe: impl std::io::Read + Send + 'static) -> Gathered {
        use std::io::BufRead as _;
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = std::sync::Arc::clone(&text);
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut t = sink.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
            }
        });
        Gathered { text, reader }
    }

    /// Everything, once the pipe is closed (the process exited).
    fn all(self) -> String {
        self.reader.join().unwrap();
        self.text.lock().unwrap().clone()
    }
}

/// `kas agent reconcile AGENT --wait --timeout 120s` started, its output gathered as it comes.
fn follow_reconcile(kas: &Kas, agent: &str) -> (std::process::Child, Gathered, Gathered) {
    let mut child = kas
        .cli()
        .args(["agent", "reconcile", agent, "--wait", "--timeout", "120s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = Gathered::start(child.stdout.take().unwrap());
    let stderr = Gathered::start(child.stderr.take().unwrap());
    (child, stdout, stderr)
}

/// Waits for `child` to end: its status, standard output and error, and all three as text.
async fn ended(
    mut child: std::process::Child,
    stdout: Gathered,
    stderr: Gathered,
) -> (std::process::ExitStatus, String, String, String) {
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let (stdout, stderr) = (stdout.all(), stderr.all());
    let all = format!("exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    (status, stdout, stderr, all)
}

/// Waits until `text` contains `what`.
async fn until_said(text: &std::sync::Mutex<String>, what: &str) {
    wait_for(what, Duration::from_secs(60), || async {
        text.lock().unwrap().contains(what).then_some(())
    })
    .await;
}

/// kas killed and started again while `kas agent reconcile --wait` follows a synchronization
/// (a restart, a rolling restart of replicas): the wait rides it out, says kas is unreachable
/// and then back, and ends with the agent's report and exit 0 (it exited 1 at the first poll
/// that found no kas, failing CI jobs that waited through an upgrade of kas).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_wait_rides_out_a_kas_restart_and_ends_with_the_report() {
    let (mut rig, ns, _) = configmap_rig("recrestart").await;
    // Available only once its pod has been Ready for a while: the synchronization answering
    // the reconcile lasts that long (kwok's node makes the pod Ready at once).
    let slow = String::from_utf8(support::gitops::deployment("slow", &ns, 1))
        .unwrap()
        .replace("  replicas: 1\n", "  replicas: 1\n  minReadySeconds: 8\n");
    let c2 = rig
        .manifests
        .commit(&[("manifests/slow.yaml", Some(slow.as_bytes()))], "slow");
    let (child, stdout, stderr) = follow_reconcile(&rig.kas, "group/config:seed");
    until_said(
        &stdout.text,
        &format!("group/manifests: fetched, commit {}", &c2[..12]),
    )
    .await;
    rig.kas.kill9();
    until_said(&stderr.text, "kas: kas is unreachable (calling kas at").await;
    rig.kas.start_again().await;
    let (status, stdout, stderr, all) = ended(child, stdout, stderr).await;
    assert_eq!(status.code(), Some(0), "{all}");
    assert!(
        stdout.contains(&format!(
            "group/manifests: commit {} succeeded: 2 applied, 2 Current, 0 not Current, 0 pruned",
            &c2[..12]
        )),
        "{all}"
    );
    assert!(
        stderr.contains("still waiting for the agent's report (until the --timeout of 2m)")
            && stderr.contains("kas: kas answers again (unreachable for "),
        "{all}"
    );
}

/// The rig's `config.yaml` with the seed's entry and, with `other`, an entry of project
/// `group/other` too.
fn with_other(ns: &str, other: bool) -> Vec<u8> {
    let mut yaml = format!(
        "gitops:\n  manifest_projects:\n  - id: group/manifests\n    default_namespace: {ns}\n    paths:\n    - glob: '/manifests/*.{{yaml,yml,json}}'\n"
    );
    if other {
        yaml.push_str(&format!(
            "  - id: group/other\n    default_namespace: {ns}\n    paths:\n    - glob: '/*.yaml'\n"
        ));
    }
    yaml.into_bytes()
}

/// A project `group/other` known to kas, holding ConfigMap `other` of `ns`; its commit.
async fn other_project(rig: &Rig, ns: &str) -> (support::GitRepo, String) {
    let repo = support::GitRepo::init(&rig._dir.path().join("other"));
    let c = repo.commit(&[("cm.yaml", Some(&configmap("other", ns, "v1")))], "other");
    rig.kas.set_projects(&[("group/other", &repo)]).await;
    (repo, c)
}

fn push_config(rig: &Rig, yaml: &[u8], message: &str) {
    let path = ".gitlab/agents/seed/config.yaml";
    rig.config.commit(&[(path, Some(yaml))], message);
}

/// `kas agent reconcile AGENT --project group/other MORE`.
fn reconcile_other(rig: &Rig, more: &[&str]) -> Output {
    let agent = agent_name(rig);
    let mut args = vec!["agent", "reconcile", &agent, "--project", "group/other"];
    args.extend_from_slice(more);
    kas_cli(&rig.kas, &args)
}

/// `kas agent reconcile --project P --wait` right after a push of `config.yaml` adding P's
/// entry: kas reads the new configuration before it looks P up, and the agent's new worker
/// answers. It failed at once with "not a manifest project of the configuration in force".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_of_an_entry_just_added_to_the_configuration_waits_for_it_and_syncs_it() {
    let (rig, ns, _) = configmap_rig("recadded").await;
    let (_other, c) = other_project(&rig, &ns).await;
    push_config(&rig, &with_other(&ns, true), "add an entry");
    let out = reconcile_other(&rig, &["--wait", "--timeout", "90s"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "group/other: commit {} succeeded: 1 applied, 1 Current",
            &c[..12]
        )),
        "{}",
        text(&out)
    );
    assert_eq!(value(&rig.env, &ns, "other"), "v1");
}

/// `kas agent reconcile --wait` of every entry right after a push of `config.yaml` removing
/// one: the removed entry is not waited for (its worker stops and never reports; the wait
/// lasted until `--timeout`, exit 3), and naming it is refused as naming an unknown one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_wait_right_after_an_entry_was_removed_does_not_wait_for_it() {
    let (rig, ns, _) = configmap_rig("recremoved").await;
    let (_other, c) = other_project(&rig, &ns).await;
    push_config(&rig, &with_other(&ns, true), "add an entry");
    rig.synced_in("group/other", &c).await;
    push_config(&rig, &with_other(&ns, false), "remove the entry");
    let out = reconcile_wait(&rig.kas, &agent_name(&rig), "30s");
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("group/other"), "{}", text(&out));
    let named = reconcile_other(&rig, &[]);
    assert_eq!(named.status.code(), Some(1), "{}", text(&named));
    assert!(
        String::from_utf8_lossy(&named.stderr).contains(
            "group/other is not a manifest project of the agent's configuration in force"
        ),
        "{}",
        text(&named)
    );
}

/// `kas agent reconcile --wait` started while kas is down (a restart under a CI job): the
/// request is asked again until kas answers, then followed to the report (it failed at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_started_while_kas_is_down_asks_again_until_kas_answers() {
    reconcile_while_kas_is_down("recdown", agent_name).await;
}

/// The same with the agent named `project:name`, which kas must look up: the lookup rides out
/// kas being down as the request does (it failed at once with "kas is unreachable").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_of_an_agent_named_by_project_while_kas_is_down_waits_for_kas() {
    reconcile_while_kas_is_down("recdownn", |_| "group/config:seed".into()).await;
}

/// `kas agent reconcile --wait` of an agent that is offline ends by its `--timeout` with exit
/// 4 naming the project no stream heard (without `--wait` too) (it ended with exit 1, "kas did not answer the
/// reconcile request": kas waited for the agent's stream exactly as long as the command).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_of_an_offline_agent_exits_4_naming_the_project_unheard() {
    let (mut rig, _ns, _c1) = configmap_rig("recoff").await;
    rig.agent.kill9();
    let agent = agent_name(&rig);
    let out = kas_cli(
        &rig.kas,
        &["agent", "reconcile", &agent, "--wait", "--timeout", "5s"],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(4), "{all}");
    assert!(
        all.contains("group/manifests: agent") && all.contains("has no GitOps stream for it"),
        "{all}"
    );
    // Without --wait: the same exit, and no line saying the agent was asked (it said "agent 1
    // asked to synchronize now" under the line saying nothing heard it).
    let out = kas_cli(&rig.kas, &["agent", "reconcile", &agent]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(4), "{all}");
    assert!(all.contains("has no GitOps stream for it"), "{all}");
    assert!(!all.contains("asked to synchronize now"), "{all}");
}

/// `kas agent ping` and `kas agent diff` of an agent that went offline say within their short
/// wait for a reconnect (5 s) that it is not connected, naming it and when its connection
/// ended, and exit 4; one that never connected is said to be unseen. They waited out kas's
/// wait for a tunnel (20 s by default) and printed the API's raw JSON error body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_diff_of_an_offline_agent_say_so_promptly_and_exit_4() {
    let opts = KasOptions {
        tunnel_wait: "20s",
        ..KasOptions::default()
    };
    let (mut rig, _ns, _c1) = configmap_rig_with("pingoff", "", &[], opts).await;
    rig.agent.kill9();
    let id = rig.agent_id;
    wait_for(
        "kas to see the agent gone",
        Duration::from_secs(10),
        || async { (!rig.kas.agent(id).await.connected).then_some(()) },
    )
    .await;
    let seen = rig.kas.agent(id).await;
    let named = format!(
        "agent {id} ({}:{}) is not connected",
        seen.project, seen.name
    );
    let gone = format!("{named} (last seen connected at ");
    let never = rig.kas.admin.register_agent("group/other", "never").await;
    let never = never.unwrap().agent_id.to_string();
    let agent = agent_name(&rig);
    let cases = [
        (vec!["agent", "ping", &agent], gone.as_str()),
        (vec!["agent", "diff", &agent, "--ref", "main"], &gone),
        (
            vec!["agent", "ping", &never],
            "(group/other:never) is not connected (kas has never seen it connected)",
        ),
    ];
    for (args, said) in cases {
        let t0 = std::time::Instant::now();
        let out = kas_cli(&rig.kas, &args);
        let took = t0.elapsed();
        let all = text(&out);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {all}");
        assert!(
            took < Duration::from_secs(12),
            "{args:?} took {took:?}: {all}"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(said), "{args:?}: {all}");
        assert!(!stderr.contains('{'), "{args:?}: raw JSON: {all}");
    }
}

/// With kas's database disk full, `kas agent reconcile --wait` ends as soon as the agent's
/// answering sync ends, saying kas could not record its report and why, and exits 6;
/// `kas agent status` says the same until the report is recorded (agentk sends it again once
/// the disk has room). The reconcile waited out its `--timeout` (exit 3), the reason only in
/// kas's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_whose_report_kas_cannot_record_says_why_promptly_and_exits_6() {
    let disk = tether_testenv::tmpfs::Tmpfs::mount(16 * 1024);
    let db = disk.path().join("kas.sqlite");
    let opts = KasOptions {
        extra_yaml: format!("database:\n  sqlite_path: {}\n", db.display()),
        ..KasOptions::default()
    };
    let (rig, _ns, c1) = configmap_rig_with("unrecorded", "", &[], opts).await;
    let agent = agent_name(&rig);
    let filler = disk.fill();
    let t0 = std::time::Instant::now();
    let out = reconcile_wait(&rig.kas, &agent, "90s");
    let took = t0.elapsed();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(6), "{all}");
    assert!(took < Duration::from_secs(45), "took {took:?}: {all}");
    let said = format!(
        "group/manifests: NOT RECORDED: the agent's sync of commit {} ended, but kas could not record its report: ",
        &c1[..12]
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&said), "{all}");
    let status = |kas: &Kas| text(&kas_cli(kas, &["agent", "status", &agent]));
    let shown = status(&rig.kas);
    assert!(shown.contains(&said), "{shown}");
    // A script reading the status must not take the older report shown for the truth.
    let checked = kas_cli(&rig.kas, &["agent", "status", &agent]);
    assert_eq!(checked.status.code(), Some(8), "{}", text(&checked));
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert!(
        stderr.contains("group/manifests  NOT RECORDED: "),
        "{stderr}"
    );

    std::fs::remove_file(filler).unwrap();
    wait_for("the report recorded", Duration::from_secs(120), || async {
        (!status(&rig.kas).contains("NOT RECORDED")).then_some(())
    })
    .await;
}

/// `kas agent reconcile --wait` right after a push of a `config.yaml` kas refuses: the agent
/// synchronizes with the configuration still in force, and the command says the newest one
/// was refused and exits 5, as `kas agent status` does. It exited 0 without a word, so a CI
/// step "push config.yaml, then reconcile --wait" passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_after_a_refused_configuration_says_so_and_exits_5() {
    let (rig, ns, c1) = configmap_rig("recrefused").await;
    let mut refused = with_other(&ns, false);
    refused.extend_from_slice(b"no_such_key: 1\n");
    push_config(&rig, &refused, "an unknown key");
    let agent = agent_name(&rig);
    let out = kas_cli(
        &rig.kas,
        &["agent", "reconcile", &agent, "--wait", "--timeout", "60s"],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(5), "{all}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("REFUSED: configuration refused at commit"),
        "{all}"
    );
    assert!(stdout.contains("no_such_key"), "{all}");
    assert!(
        stdout.contains(&format!("group/manifests: commit {} succeeded", &c1[..12])),
        "{all}"
    );
}

async fn reconcile_while_kas_is_down(prefix: &str, agent: fn(&Rig) -> String) {
    let (mut rig, _ns, c1) = configmap_rig(prefix).await;
    rig.kas.kill9();
    let (child, stdout, stderr) = follow_reconcile(&rig.kas, &agent(&rig));
    until_said(&stderr.text, "kas: kas is unreachable (calling kas at").await;
    rig.kas.start_again().await;
    let (status, stdout, stderr, all) = ended(child, stdout, stderr).await;
    assert_eq!(status.code(), Some(0), "{all}");
    assert!(
        stdout.contains(&format!("group/manifests: commit {} succeeded", &c1[..12])),
        "{all}"
    );
    assert!(stderr.contains("asking again"), "{all}");
}
