//! kas's internal HTTP API as its clients see it: the request and response types of every
//! route, and [`AdminClient`], which calls them with the admin token. kas serves these types;
//! the admin commands, `tether-bench` and `tether-loadgen` use them without linking kas.

mod agent_ref;
mod client;
mod diff;
mod reported;
mod unreported;

use serde::{Deserialize, Serialize};

pub use agent_ref::{AgentRef, InvalidAgentRef};
pub use client::{AdminClient, ClientError};
pub use diff::{
    DiffChange, DiffRequest, DiffView, ObjectDiffView, PROXY_DIFF_PATH, PROXY_KUBECONFIG_PATH,
    ProjectDiffView,
};
pub use reported::{ReportedOutcome, ReportedStatus};
pub use unreported::{EntryState, UnreportedView};
// A user's memberships are the proxy's type from the command line to the store.
pub use tether_kubeproxy_server::{AccessLevel, Membership, MembershipKind, MembershipSpecError};

/// What kas knows of an agent's configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConfigView {
    /// Commit of the configuration in force ("" when none was sent yet).
    pub commit: String,
    /// The file it came from ("" for the empty default).
    pub file: String,
    /// Why the newest commit's file was refused, if it was.
    pub error: Option<String>,
    pub error_commit: Option<String>,
    /// Unix seconds of the last change of this state.
    pub updated_at: u64,
    /// Set while the replica serving the agent failed to store this configuration in force
    /// and retries (every 5 s): the other replicas authorize with the stored one meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unstored: Option<UnstoredView>,
}

/// A configuration in force not yet stored (see [`ConfigView::unstored`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnstoredView {
    /// Unix seconds of the first failed write.
    pub since: u64,
    /// Why the last write failed.
    pub error: String,
    /// The commit in force in the stored record, which the other replicas use ("": none
    /// stored; `None`: the store could not be read either, or not within the listing's
    /// deadline).
    pub stored_commit: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectionView {
    pub connected_since: String,
    pub agent_version: String,
    pub pod_name: String,
    pub pod_namespace: String,
    /// Which cluster the connection comes from: the UID of agentk's ServiceAccount (empty:
    /// unknown — agentk outside a cluster, or older than this field).
    #[serde(default)]
    pub cluster_id: String,
    pub remote_addr: String,
    pub streams: usize,
    /// The kas replica holding the connection: its peers address (`peers.advertise_address`);
    /// empty for a kas without peers.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub replica: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AgentView {
    pub id: i64,
    pub project: String,
    pub name: String,
    pub connected: bool,
    pub idle_tunnels: usize,
    pub connections: Vec<ConnectionView>,
    /// The configuration in force and the last refusal, as kas knows them.
    pub config: Option<ConfigView>,
    /// Its GitOps suspensions (`kas agent suspend`); empty when none.
    #[serde(default)]
    pub suspensions: Vec<SuspensionView>,
    /// The kas replicas that could not be asked for their connections to the agent (their
    /// address, or why the replicas could not be listed): the agent may be connected there, so
    /// `connected: false` then means "unknown". Empty when every replica answered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable_replicas: Vec<String>,
    /// When it was last seen connected (RFC 3339), the newest any replica knows: the end of
    /// its last connection, or the last time a replica noted its token in use (stored, so it
    /// outlives restarts); absent when never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Why kas's last fetch of the agent's configuration project failed: a config.yaml pushed
    /// since is not fetched, and the configuration in force is the last kas has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_fetch_error: Option<String>,
}

impl ConfigView {
    /// "commit X in force, not yet stored: …" while [`ConfigView::unstored`] is set: why the
    /// replicas disagree on the agent's configuration, for `kas agent status` and the web UI.
    pub fn unstored_note(&self) -> Option<String> {
        let u = self.unstored.as_ref()?;
        let short = |c: &str| c.get(..12).unwrap_or(c).to_owned();
        let others = match u.stored_commit.as_deref() {
            Some("") => "no configuration (none is stored)".to_owned(),
            Some(c) => format!("commit {}", short(c)),
            None => "the stored one (unknown: the store could not be read either)".to_owned(),
        };
        Some(format!(
            "configuration in force: commit {}, not yet stored: other replicas still use {others} — retrying (last error: {})",
            short(&self.commit),
            u.error
        ))
    }
}

impl AgentView {
    /// Whether the agent may be connected to a replica that did not answer (it is connected
    /// to none that did).
    pub fn connection_unknown(&self) -> bool {
        !self.connected && !self.unreachable_replicas.is_empty()
    }

    /// "unknown (replica X did not answer)" for [`AgentView::connection_unknown`], else
    /// "connected" or "offline".
    pub fn connection_state(&self) -> String {
        if self.connected {
            "connected".into()
        } else if self.connection_unknown() {
            format!(
                "unknown ({} did not answer)",
                self.unreachable_replicas.join(", ")
            )
        } else {
            "offline".into()
        }
    }

    /// The clusters the agent is connected from, when more than one: its token is installed
    /// in several clusters (kas routes CI jobs to either, and each applies its GitOps). A Pod
    /// is in the cluster its newest connection tells: an older one may still carry the UID of
    /// a ServiceAccount since created again.
    pub fn clusters_sharing_token(&self) -> Vec<&str> {
        let newer_of_its_pod = |c: &ConnectionView| {
            !c.pod_name.is_empty()
                && self.connections.iter().any(|o| {
                    o.pod_name == c.pod_name
                        && o.pod_namespace == c.pod_namespace
                        && o.connected_since > c.connected_since
                })
        };
        let mut ids: Vec<&str> = self
            .connections
            .iter()
            .filter(|c| !newer_of_its_pod(c))
            .map(|c| c.cluster_id.as_str())
            .filter(|id| !id.is_empty())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() < 2 {
            ids.clear();
        }
        ids
    }
}

/// A GitOps suspension: nothing of the project (or, without one, of any manifest project of
/// the agent) is applied, pruned or drift-corrected.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SuspensionView {
    /// The manifest project's path; `None`: every manifest project of the agent.
    pub project: Option<String>,
    pub reason: String,
    /// Who: `admin` (the admin token), with the name the CLI reported in parentheses.
    pub suspended_by: String,
    /// RFC 3339.
    pub suspended_at: String,
    /// In the answer to a suspension of a project: the entries of the agent's configuration in
    /// force it holds — all of the project's, as suspensions hold a whole project, even when
    /// the request named one entry (`project#name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<String>,
}

/// `POST /api/v1/agents/{id}/suspend` (and `resume`, which ignores the reason).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SuspendRequest {
    /// A manifest project's path or id; `None`: every manifest project of the agent.
    #[serde(default)]
    pub project: Option<String>,
    #[serde(default)]
    pub reason: String,
    /// The name the person at the CLI goes by (`$USER`); recorded next to `admin`.
    #[serde(default)]
    pub requested_by: Option<String>,
}

/// What `resume` lifted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Resumed {
    pub resumed: u64,
}

/// `POST /api/v1/agents/{id}/reconcile`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReconcileRequest {
    /// A manifest project's path or id; `None`: every manifest project of the agent.
    #[serde(default)]
    pub project: Option<String>,
    /// How long kas may wait, in milliseconds, for what a reconcile right after a change
    /// needs: the agent's configuration in force to catch up with its configuration project's
    /// newest commit (an entry just added or removed), and the agent's GitOps stream of each
    /// project (agentk restarts a worker whose entry changed). `None` (an older CLI): no wait.
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// A reconcile under way: its id (reports answering it carry it) and each project asked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReconcileStarted {
    pub resync_id: u64,
    pub projects: Vec<ReconcileTarget>,
}

/// One manifest project of a reconcile.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReconcileTarget {
    /// As the agent's configuration names it (what its sync reports are keyed by).
    pub project: String,
    /// The commit of the ref the agent follows (the default branch unless its configuration
    /// names another) after the fetch: the one the reconcile's sync should report.
    pub commit: Option<String>,
    /// Why the fetch failed (the last good commit is synced).
    pub fetch_error: Option<String>,
    /// How many of the agent's streams heard the request (0: offline or not leading).
    pub streams: usize,
    /// Set when the project is suspended and a reconcile of the whole agent skipped it: who
    /// suspended it and why, in words. (A reconcile naming the project is refused instead.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended: Option<String>,
}

/// `POST /api/v1/agents/{id}/reconcile/supersedes`: whether the commit an agent reported for a
/// reconcile is newer than the one the reconcile fetched (pushed in between) and includes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SupersedesRequest {
    /// The manifest project, as the agent's configuration names it.
    pub project: String,
    pub fetched: String,
    pub reported: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SupersedesView {
    /// `reported` descends from `fetched` (and is not it).
    pub supersedes: bool,
}

/// How far a sync under way for `kas agent reconcile` got.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgressView {
    pub project_id: String,
    pub commit_id: String,
    /// The reconcile it answers.
    pub resync_id: u64,
    /// Objects so far (pruned aside), and how many are Current or Failed.
    pub objects: u32,
    pub current: u32,
    pub failed: u32,
    /// The first object (in object order) neither Current nor Failed yet, with its status's
    /// reason: what a wait is waiting for. None from an agent older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<ObjectView>,
    /// Set when the sync ended but kas could not record the agent's report of it: the store's
    /// error (read-only, disk full). The agent sends the report again until kas records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unrecorded: Option<String>,
}

impl ProgressView {
    /// "the agent's sync of commit C ended, but kas could not record its report: …", when
    /// [`ProgressView::unrecorded`] is set, for `kas agent reconcile`, status and the web UI.
    /// "; not Current yet: Kind/namespace/name Status: message" of the object the sync waits
    /// for, or nothing: appended to a line of progress.
    pub fn pending_note(&self) -> String {
        self.pending
            .as_ref()
            .map(|o| format!("; not Current yet: {}", o.line()))
            .unwrap_or_default()
    }

    pub fn unrecorded_note(&self) -> Option<String> {
        let error = self.unrecorded.as_ref()?;
        Some(format!(
            "the agent's sync of commit {} ended, but kas could not record its report: {error} (the agent sends it again until kas can)",
            self.commit_id.get(..12).unwrap_or(&self.commit_id)
        ))
    }
}

/// What deleting an agent ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentDeleted {
    pub agent_id: i64,
    pub tokens_revoked: usize,
    pub streams_ended: usize,
    pub user_requests_ended: usize,
}

/// A personal access token's record (never the token).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserTokenView {
    pub id: i64,
    pub agent_id: i64,
    pub username: String,
    pub memberships: Vec<Membership>,
    /// Unix seconds.
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    /// `active`, `expired` or `revoked`, as kas judges it by its own clock (the one it
    /// authenticates with); absent from older kas, for which the CLI judges by its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct ProjectRequest {
    pub path: String,
    pub remote: Option<String>,
    #[serde(default)]
    pub credentials_file: Option<String>,
    #[serde(default)]
    pub webhook_secret_file: Option<String>,
    /// Deploy key (OpenSSH private key file) for an SSH remote.
    #[serde(default)]
    pub ssh_key_file: Option<String>,
    /// The SSH server's pinned host keys (`known_hosts` file).
    #[serde(default)]
    pub known_hosts_file: Option<String>,
    /// Trusted SSH signing keys (allowed-signers file); set, only signed commits are used.
    #[serde(default)]
    pub verify_allowed_signers_file: Option<String>,
    /// Trusted OpenPGP keys (armored keyring file); set, only signed commits are used.
    #[serde(default)]
    pub verify_gpg_keyring_file: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProjectView {
    pub id: i64,
    pub path: String,
    pub remote: Option<String>,
    pub webhooks: bool,
    /// Default branch commit at the last successful fetch.
    pub commit: Option<String>,
    pub last_fetch: Option<String>,
    pub fetch_error: Option<String>,
    pub fetches: u64,
    pub fetch_failures: u64,
    /// Signed commits only: the default branch's commit kas refused at the last fetch (`commit`
    /// stays the last verified one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<RefusalView>,
}

/// A commit refused because it is not signed by a key the project trusts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RefusalView {
    pub commit: String,
    /// Who signed it, when it is signed and the signer could be told.
    pub signer: Option<String>,
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub project: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenCreated {
    pub agent_id: i64,
    pub token_id: i64,
    /// Shown once; kas keeps only its SHA-256.
    pub token: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenView {
    pub id: i64,
    pub agent_id: i64,
    pub description: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    /// Unix seconds: when kas last saw a connection authenticated with it open (written every
    /// few seconds, and at each token re-check while it stays open); `None` if never.
    #[serde(default)]
    pub last_used_at: Option<i64>,
    /// Streams to kas open with it, on every replica (each counts its own and the one that
    /// answered adds the others'): what revoking it ends. 0 once agentk moved to a newer token.
    #[serde(default)]
    pub open_streams: usize,
    /// Replicas that did not say how many streams they hold with it: `open_streams` misses
    /// theirs. Empty with one kas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streams_unknown_on: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct CreateTokenRequest {
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Revoked {
    pub token_id: i64,
    pub was_active: bool,
    pub streams_ended: usize,
    /// Set when Redis did not take the message telling the other kas replicas: why, and when
    /// they end the token's streams anyway. The revocation itself is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_not_told: Option<String>,
}

/// Numbers for leak checks and dashboards.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, Clone, Copy)]
pub struct Stats {
    pub tasks: usize,
    pub agent_connections: usize,
    pub open_streams: usize,
    pub idle_streams: usize,
    pub connected_agents: usize,
    pub rss_bytes: u64,
    /// Agents this replica keeps something about in memory (configuration in force, syncs
    /// under way, GitOps directives): a deleted agent must leave it, on every replica.
    #[serde(default)]
    pub remembered_agents: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UserTokenRequest {
    pub username: String,
    /// GitLab-style memberships (`{"kind":"project","path":"group/app","id":42,"access_level":"developer"}`).
    #[serde(default)]
    pub memberships: Vec<Membership>,
    /// Lifetime in seconds (default 30 days, at most 1 year).
    #[serde(default)]
    pub expires_in_seconds: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct UserTokenCreated {
    pub token_id: i64,
    pub agent_id: i64,
    pub username: String,
    /// Shown once; kas keeps only its SHA-256.
    pub token: String,
    pub expires_at: i64,
    /// What the token will not get that its issuer may expect (memberships without an id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One manifest project's last synchronization as an agent reported it.
#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct SyncView {
    pub project_id: String,
    pub commit_id: String,
    pub outcome: ReportedOutcome,
    pub error: String,
    pub finished_at: String,
    pub dry_run: bool,
    pub objects: Vec<ObjectView>,
    /// What kas warned about the commit's manifests (symlinks skipped, nothing matched).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The newest `kas agent reconcile` this synchronization answers (0: none).
    #[serde(default)]
    pub resync_id: u64,
    /// The chart version a `helm.repository` entry's sync applied ("" for other entries, and
    /// from agents or kas older than this field).
    #[serde(default)]
    pub chart_version: String,
    /// Why kas's last fetch of the entry's project failed ("" when it did not): the report
    /// is then of the last commit kas had, and newer pushes do not reach the agent.
    #[serde(default)]
    pub fetch_error: String,
    /// The commit kas has for the entry when it is not the one reported ("" otherwise): the
    /// agent has not reported on it yet — a sync under way, or no replica leading and
    /// connected to kas.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub newer_commit: String,
    /// Since when kas has had `newer_commit` (RFC 3339): for an entry on another branch, a tag
    /// or a commit, since a stream serving it first found it there; after a kas restart, at
    /// least since kas started. Absent when kas does not know (from kas older than this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newer_since: Option<String>,
    /// A suspension holds the entry's project (of the whole agent, or of the project however
    /// the entry names it: path or numeric id): a newer commit waiting is no stall.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    /// The agent's GitOps streams for the entry open on the kas that answered: only the
    /// leading agentk replica opens them, so 0 while the agent is connected means no replica
    /// leads (its Kubernetes API server does not answer, or its Lease cannot be renewed).
    /// Absent when unknown: another replica may hold the stream, or kas is older than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<usize>,
    /// The reports this one replaced in the ten minutes before it, newest first (at most
    /// four), in short: a sync replaced before anyone read it is still told.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<EarlierView>,
}

/// A synchronization whose report a later one replaced, in short (see [`SyncView::earlier`]).
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct EarlierView {
    pub commit_id: String,
    pub outcome: ReportedOutcome,
    pub error: String,
    pub finished_at: String,
    pub resync_id: u64,
    /// Its objects applied and Current, applied and not Current, pruned, and left in place
    /// instead of pruned.
    pub current: u32,
    pub not_current: u32,
    /// Of `not_current`, those whose write failed (not applied).
    #[serde(default)]
    pub not_applied: u32,
    pub pruned: u32,
    pub left_in_place: u32,
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct ObjectView {
    pub group: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub status: ReportedStatus,
    pub message: String,
    /// The sync's write of it failed (apply refused, or delete of an object that left Git):
    /// not counted as applied. Absent (false) from an agent older than this field.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_applied: bool,
}

impl ObjectView {
    /// `Kind/namespace/name Status: message` (`-` for no namespace): how the CLI and the web UI
    /// name an object with its status.
    pub fn line(&self) -> String {
        let ns = if self.namespace.is_empty() {
            "-"
        } else {
            &self.namespace
        };
        format!(
            "{}/{ns}/{} {}: {}",
            self.kind, self.name, self.status, self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unstored_configuration_names_what_the_other_replicas_use() {
        let view = |stored: Option<&str>| ConfigView {
            commit: "aaaaaaaaaaaaaaaa".into(),
            unstored: Some(UnstoredView {
                since: 1,
                error: "disk full".into(),
                stored_commit: stored.map(str::to_owned),
            }),
            ..ConfigView::default()
        };
        let note = |stored| view(stored).unstored_note().unwrap_or_default();
        assert_eq!(
            note(Some("bbbbbbbbbbbbbbbb")),
            "configuration in force: commit aaaaaaaaaaaa, not yet stored: other replicas still use commit bbbbbbbbbbbb — retrying (last error: disk full)"
        );
        assert!(note(Some("")).contains("still use no configuration"));
        assert!(note(None).contains("still use the stored one (unknown"));
        assert_eq!(ConfigView::default().unstored_note(), None, "stored");
    }

    #[test]
    fn a_pod_is_in_the_cluster_its_newest_connection_tells() {
        let conn = |pod: &str, since: &str, cluster: &str| {
            serde_json::json!({"connected_since": since, "agent_version": "v", "pod_name": pod,
                "pod_namespace": "ns", "cluster_id": cluster, "remote_addr": "a", "streams": 1})
        };
        let agent = |conns: Vec<serde_json::Value>| -> AgentView {
            serde_json::from_value(serde_json::json!({"id": 1, "project": "p", "name": "n",
                "connected": true, "idle_tunnels": 1, "connections": conns, "config": null}))
            .expect("an agent view")
        };
        let recreated = agent(vec![
            conn("a", "2026-11-29T12:00:00Z", "uid-old"),
            conn("a", "2026-11-29T12:30:00Z", "uid-new"),
            conn("b", "2026-11-29T12:31:00Z", "uid-new"),
        ]);
        assert!(
            recreated.clusters_sharing_token().is_empty(),
            "one cluster whose ServiceAccount was created again"
        );
        let shared = agent(vec![
            conn("a", "2026-11-29T12:00:00Z", "uid-1"),
            conn("b", "2026-11-29T12:30:00Z", "uid-2"),
        ]);
        assert_eq!(shared.clusters_sharing_token(), ["uid-1", "uid-2"]);
        let unnamed = agent(vec![
            conn("", "2026-11-29T12:00:00Z", "uid-1"),
            conn("", "2026-11-29T12:30:00Z", "uid-2"),
        ]);
        assert_eq!(
            unnamed.clusters_sharing_token().len(),
            2,
            "agentk outside a cluster is never known to be one Pod"
        );
    }
}
