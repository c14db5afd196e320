//! `gitops:` — which projects' manifests the agent applies, and how.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::check::{
    check_full_path, check_namespace, check_non_empty, is_commit_id, null_as_default, one_of_error,
};
use crate::depends::find_cycle;
use crate::duration::{format_duration, serde_go};
use crate::entry::{EntryRef, check_entry_name, entry_identity, entry_key};
use crate::post_build::PostBuild;
use crate::render::{Helm, Kustomize};
use crate::{ConfigError, DEFAULT_NAMESPACE};

/// Upstream's limit on `paths` entries per manifest project; each path is a separate tree walk
/// on the server, so the count is bounded.
pub const MAX_PATHS_PER_PROJECT: usize = 100;

/// The glob used when a manifest project lists no `paths`.
pub const DEFAULT_GLOB: &str = "**/*.{yaml,yml,json}";

/// Default for both `reconcile_timeout` and `prune_timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// The longest `reconcile_timeout` or `prune_timeout` accepted: a week, far beyond any real
/// wait for objects to become ready or be gone. Larger values are mistakes, and the largest
/// (up to 2^64 seconds parse) would overflow agentk's clock arithmetic.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The `gitops` section.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gitops {
    /// Projects whose manifests are synchronized into the cluster.
    #[serde(default, deserialize_with = "null_as_default")]
    pub manifest_projects: Vec<ManifestProject>,
    /// Field managers whose fields agentk takes over before applying, so that the apply
    /// removes or restores what they changed by hand (see [`DEFAULT_DRIFT_MANAGERS`]); `None`
    /// means the default list, an empty list turns the takeover off.
    // Left out when unset: an agentk older than the key refuses unknown keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_managers: Option<Vec<String>>,
}

/// The field managers of people at a terminal, whose changes to an object agentk applies are
/// drift: `kubectl` commands (`kubectl apply` client-side, `edit`, `label`, `annotate`,
/// `patch`, `scale`, `set`, `replace`, `create`, and `kubectl apply --server-side`, whose
/// manager is plain `kubectl`) and `before-first-apply`, the entry the API server gives the
/// fields an object had before its first server-side apply. Never a controller's:
/// `kube-controller-manager` (an HPA's `spec.replicas`) and operators keep their fields.
/// `kubectl-rollout` is left out on purpose: taking over the `restartedAt` annotation of
/// `kubectl rollout restart` would remove it and restart the Pods a second time (a rollback's
/// changed values are restored by the apply anyway).
pub const DEFAULT_DRIFT_MANAGERS: &[&str] = &[
    "kubectl",
    "kubectl-client-side-apply",
    "before-first-apply",
    "kubectl-edit",
    "kubectl-label",
    "kubectl-annotate",
    "kubectl-patch",
    "kubectl-scale",
    "kubectl-set",
    "kubectl-replace",
    "kubectl-create",
];

/// One `gitops.manifest_projects[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestProject {
    /// The project holding the manifests.
    pub id: ProjectRef,
    /// Tells this entry from the project's other entries (one per folder of a monorepo):
    /// required on every entry of a project listed more than once ([`ENTRY_NAME_RULE`]).
    /// Its objects are then its own inventory's, and `depends_on` names it `project#name`.
    ///
    /// [`ENTRY_NAME_RULE`]: crate::ENTRY_NAME_RULE
    // Left out when unset: an agentk older than the key refuses unknown keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Namespace for namespaced objects that do not name one.
    #[serde(default = "default_namespace")]
    pub default_namespace: String,
    /// Which files to apply; never empty after deserialization.
    #[serde(default = "default_paths", deserialize_with = "paths_or_default")]
    pub paths: Vec<PathGlob>,
    /// How long to wait for applied objects to become Current.
    #[serde(default = "default_timeout", with = "serde_go")]
    pub reconcile_timeout: Duration,
    /// Whether to apply for real or only dry-run.
    #[serde(default)]
    pub dry_run_strategy: DryRunStrategy,
    /// Whether objects that left the manifest set are deleted.
    #[serde(default = "default_true")]
    pub prune: bool,
    /// Whether a commit that selects no object at all may prune everything the project
    /// applied before. Off: such a commit (every file deleted, the selected directory renamed)
    /// fails and prunes nothing, as a mistake is likelier than a wish to empty the cluster.
    // Left out when false: an agentk older than the key refuses unknown keys in the
    // configuration kas sends it, so a default must not appear there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_empty: bool,
    /// How long to wait for pruned objects to be gone.
    #[serde(default = "default_timeout", with = "serde_go")]
    pub prune_timeout: Duration,
    /// Deletion propagation used when pruning.
    #[serde(default)]
    pub prune_propagation_policy: PrunePropagationPolicy,
    /// What to do with objects already owned by another inventory (or none).
    #[serde(default)]
    pub inventory_policy: InventoryPolicy,
    /// The Git reference to follow; `None` means the project's default branch.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<GitRef>,
    /// Render this Kustomize directory (in kas) instead of selecting files by `paths`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kustomize: Option<Kustomize>,
    /// Render this Helm chart (in kas) instead of selecting files by `paths`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helm: Option<Helm>,
    /// Variables agentk substitutes into the objects before applying them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_build: Option<PostBuild>,
    /// Other entries of this configuration (by `id`, or `id#name` for a named entry) whose
    /// last synchronization must have succeeded, with all their objects Current, before this
    /// one applies a commit (Flux's `dependsOn`).
    // Left out when empty: an agentk older than the key refuses unknown keys.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub depends_on: Vec<EntryRef>,
}

impl ManifestProject {
    /// A manifest project with every optional key at its documented default.
    pub fn new(id: ProjectRef) -> Self {
        ManifestProject {
            id,
            name: None,
            default_namespace: default_namespace(),
            paths: default_paths(),
            reconcile_timeout: DEFAULT_TIMEOUT,
            dry_run_strategy: DryRunStrategy::default(),
            prune: true,
            allow_empty: false,
            prune_timeout: DEFAULT_TIMEOUT,
            prune_propagation_policy: PrunePropagationPolicy::default(),
            inventory_policy: InventoryPolicy::default(),
            git_ref: None,
            kustomize: None,
            helm: None,
            post_build: None,
            depends_on: Vec::new(),
        }
    }

    /// The entry's key, which names its worker, inventory, reports and status rows: the id
    /// as written for an unnamed entry (what it always was, so an upgrade keeps them all),
    /// `id#name` for a named one.
    pub fn entry_key(&self) -> String {
        entry_key(&self.id, self.name.as_deref())
    }

    /// How `depends_on` matches the entry ([`EntryRef::identity`]).
    pub fn entry_identity(&self) -> String {
        entry_identity(&self.id, self.name.as_deref())
    }
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_owned()
}

fn default_paths() -> Vec<PathGlob> {
    vec![PathGlob {
        glob: DEFAULT_GLOB.to_owned(),
    }]
}

const fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

const fn default_true() -> bool {
    true
}

/// Said with the advice to name entries: a name is a new key, so an entry that already
/// synced would start over with an empty inventory.
const RENAMED: &str = "; an entry that already synced and gets a name starts with a new, \
                       empty inventory: its objects are taken over only with \
                       inventory_policy: adopt_all";

/// Upstream treats an empty `paths` list like a missing one, so both get the default glob.
fn paths_or_default<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathGlob>, D::Error> {
    let paths = Option::<Vec<PathGlob>>::deserialize(d)?.unwrap_or_default();
    Ok(if paths.is_empty() {
        default_paths()
    } else {
        paths
    })
}

/// One `paths[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathGlob {
    /// A doublestar glob (`**`, `{a,b}`, `?`, `[...]`) relative to the repository root.
    pub glob: String,
}

/// A GitLab project named by full path or by numeric id.
///
/// A string made only of digits is read as a numeric id, as GitLab's API does for `:id`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProjectRef {
    /// Full path such as `group/subgroup/project`.
    Path(String),
    /// Numeric project id.
    Numeric(i64),
}

impl fmt::Display for ProjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProjectRef::Path(path) => f.write_str(path),
            ProjectRef::Numeric(id) => write!(f, "{id}"),
        }
    }
}

impl Serialize for ProjectRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ProjectRef::Path(path) => s.serialize_str(path),
            ProjectRef::Numeric(id) => s.serialize_i64(*id),
        }
    }
}

impl<'de> Deserialize<'de> for ProjectRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ProjectRef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a project path (group/project) or a numeric project id")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ProjectRef, E> {
                Ok(ProjectRef::Numeric(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ProjectRef, E> {
                i64::try_from(v)
                    .map(ProjectRef::Numeric)
                    .map_err(|_| E::custom(format!("project id {v} is out of range")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ProjectRef, E> {
                if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
                    v.parse()
                        .map(ProjectRef::Numeric)
                        .map_err(|_| E::custom(format!("project id {v} is out of range")))
                } else {
                    Ok(ProjectRef::Path(v.to_owned()))
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl ProjectRef {
    pub(crate) fn validate(&self, path: &str) -> Result<(), ConfigError> {
        match self {
            ProjectRef::Numeric(id) if *id > 0 => Ok(()),
            ProjectRef::Numeric(id) => Err(ConfigError::invalid(
                path,
                format!("project id {id} must be positive"),
            )),
            ProjectRef::Path(p) => check_full_path(path, "project", p),
        }
    }

    /// Key for duplicate detection and `depends_on`: GitLab paths are case-insensitive, so
    /// `Group/App` and `group/app` are the same project and would be synchronized twice. A
    /// path and a numeric id never match: which id a path has is GitLab's to say, not the
    /// file's.
    pub fn identity(&self) -> String {
        match self {
            ProjectRef::Path(p) => p.to_ascii_lowercase(),
            ProjectRef::Numeric(id) => id.to_string(),
        }
    }
}

/// `dry_run_strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DryRunStrategy {
    /// Apply for real.
    #[default]
    None,
    /// Client-side dry run.
    Client,
    /// Server-side dry run.
    Server,
}

/// `prune_propagation_policy` (Kubernetes `DeleteOptions.propagationPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrunePropagationPolicy {
    /// Leave dependents behind.
    Orphan,
    /// Delete dependents in the background.
    Background,
    /// Delete dependents first.
    #[default]
    Foreground,
}

impl PrunePropagationPolicy {
    /// The value Kubernetes expects in `DeleteOptions.propagationPolicy`.
    pub fn as_kubernetes(self) -> &'static str {
        match self {
            PrunePropagationPolicy::Orphan => "Orphan",
            PrunePropagationPolicy::Background => "Background",
            PrunePropagationPolicy::Foreground => "Foreground",
        }
    }
}

/// `inventory_policy`: how objects not (yet) in this project's inventory are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InventoryPolicy {
    /// Only touch objects that belong to this inventory.
    #[default]
    MustMatch,
    /// Also adopt objects that belong to no inventory.
    AdoptIfNoInventory,
    /// Adopt any object, even one owned by another inventory.
    AdoptAll,
}

/// `ref`: the Git reference to synchronize.
///
/// Written as a mapping with exactly one of `branch`, `tag` or `commit`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "RawGitRef")]
pub enum GitRef {
    /// Follow the tip of a branch.
    Branch(String),
    /// A tag.
    Tag(String),
    /// A fixed commit: 40 hexadecimal digits.
    Commit(String),
}

/// The on-disk shape of `ref`; the "exactly one" rule turns it into [`GitRef`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGitRef {
    branch: Option<String>,
    tag: Option<String>,
    commit: Option<String>,
}

impl TryFrom<RawGitRef> for GitRef {
    type Error = String;

    fn try_from(raw: RawGitRef) -> Result<Self, String> {
        match (raw.branch, raw.tag, raw.commit) {
            (Some(b), None, None) => Ok(GitRef::Branch(b)),
            (None, Some(t), None) => Ok(GitRef::Tag(t)),
            (None, None, Some(c)) => Ok(GitRef::Commit(c)),
            (b, t, c) => {
                let set: Vec<&str> = [
                    ("branch", b.is_some()),
                    ("tag", t.is_some()),
                    ("commit", c.is_some()),
                ]
                .into_iter()
                .filter_map(|(name, is_set)| is_set.then_some(name))
                .collect();
                Err(one_of_error(&["branch", "tag", "commit"], &set))
            }
        }
    }
}

impl GitRef {
    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        match self {
            GitRef::Branch(name) => check_non_empty(&format!("{path}.branch"), name),
            GitRef::Tag(name) => check_non_empty(&format!("{path}.tag"), name),
            GitRef::Commit(id) if is_commit_id(id) => Ok(()),
            GitRef::Commit(id) => Err(ConfigError::invalid(
                format!("{path}.commit"),
                format!("{id:?} is not a commit id (expected 40 hexadecimal digits)"),
            )),
        }
    }
}

impl Gitops {
    /// `drift_managers` as in force: the configured list, or [`DEFAULT_DRIFT_MANAGERS`].
    pub fn drift_managers(&self) -> Vec<String> {
        match &self.drift_managers {
            Some(list) => list.clone(),
            None => DEFAULT_DRIFT_MANAGERS
                .iter()
                .map(|m| (*m).to_owned())
                .collect(),
        }
    }

    /// Checks the rules serde cannot: id and namespace syntax, globs, limits, duplicates.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, m) in self.drift_managers.iter().flatten().enumerate() {
            check_drift_manager(&format!("gitops.drift_managers[{i}]"), m)?;
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut by_project: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, project) in self.manifest_projects.iter().enumerate() {
            let base = format!("gitops.manifest_projects[{i}]");
            project.validate(&base)?;
            let listed = by_project.entry(project.id.identity()).or_default();
            self.check_listed_again(i, listed)?;
            listed.push(i);
            seen.insert(project.entry_identity(), i);
        }
        self.validate_depends_on(&seen, &by_project)
    }

    /// Entry `i` may list a project the entries `earlier` list too only when all of them
    /// have a name, each its own: the name is what keeps their inventories, reports and
    /// `depends_on` apart.
    fn check_listed_again(&self, i: usize, earlier: &[usize]) -> Result<(), ConfigError> {
        let entries = &self.manifest_projects;
        let (base, project) = (format!("gitops.manifest_projects[{i}]"), &entries[i]);
        let Some(&first) = earlier.first() else {
            return Ok(());
        };
        let unnamed = earlier.iter().find(|&&j| entries[j].name.is_none());
        let id = project.id.to_string();
        let needs_names = |at: usize, other: usize| {
            ConfigError::invalid(
                format!("gitops.manifest_projects[{at}].id"),
                format!(
                    "project {id:?} is also listed by gitops.manifest_projects[{other}]: every \
                     entry of a project listed more than once needs a name (name: infra, \
                     name: apps, ...){RENAMED}"
                ),
            )
        };
        match (&project.name, unnamed) {
            (None, Some(&j)) => Err(ConfigError::invalid(
                format!("{base}.id"),
                format!(
                    "duplicate project id {id:?}, already used by gitops.manifest_projects[{j}] \
                     (to list a project more than once, give each of its entries a name){RENAMED}"
                ),
            )),
            (None, None) => Err(needs_names(i, first)),
            (Some(_), Some(&j)) => Err(needs_names(j, i)),
            (Some(name), None) => match earlier
                .iter()
                .find(|&&j| entries[j].name.as_ref() == Some(name))
            {
                Some(j) => Err(ConfigError::invalid(
                    format!("{base}.name"),
                    format!(
                        "duplicate name {name:?} for project {id:?}, already used by \
                         gitops.manifest_projects[{j}]"
                    ),
                )),
                None => Ok(()),
            },
        }
    }

    /// `depends_on`: each item names another entry (as duplicate detection matches ids, plus
    /// `#name`), once; and the entries do not wait on each other in a cycle, which would stall
    /// them all.
    fn validate_depends_on(
        &self,
        index: &HashMap<String, usize>,
        by_project: &HashMap<String, Vec<usize>>,
    ) -> Result<(), ConfigError> {
        let mut edges: Vec<Vec<usize>> = Vec::with_capacity(self.manifest_projects.len());
        for (i, project) in self.manifest_projects.iter().enumerate() {
            let mut deps = Vec::with_capacity(project.depends_on.len());
            for (j, dep) in project.depends_on.iter().enumerate() {
                let path = format!("gitops.manifest_projects[{i}].depends_on[{j}]");
                dep.validate(&path)?;
                let Some(&target) = index.get(&dep.identity()) else {
                    let named = by_project.get(&dep.project.identity());
                    return Err(ConfigError::invalid(path, self.no_such_entry(dep, named)));
                };
                let message = if target == i {
                    Some("an entry cannot depend on itself".to_owned())
                } else if deps.contains(&target) {
                    Some(format!("{:?} is listed twice", dep.to_string()))
                } else {
                    None
                };
                if let Some(message) = message {
                    return Err(ConfigError::invalid(path, message));
                }
                deps.push(target);
            }
            edges.push(deps);
        }
        let Some(cycle) = find_cycle(&edges) else {
            return Ok(());
        };
        let named: Vec<String> = cycle
            .iter()
            .chain(cycle.first())
            .map(|&i| self.manifest_projects[i].entry_key())
            .collect();
        Err(ConfigError::invalid(
            format!("gitops.manifest_projects[{}].depends_on", cycle[0]),
            format!(
                "dependency cycle: {} (no entry of it could ever apply)",
                named.join(" -> ")
            ),
        ))
    }
}

impl Gitops {
    /// Why `dep` names no entry; `listed` are the entries of its project, if any.
    fn no_such_entry(&self, dep: &EntryRef, listed: Option<&Vec<usize>>) -> String {
        let Some(listed) = listed else {
            return format!(
                "{:?} is not the id of another gitops.manifest_projects entry (write it as \
                 that entry's id is written: a path and a numeric id are not matched)",
                dep.to_string()
            );
        };
        let keys: Vec<String> = listed
            .iter()
            .map(|&j| format!("{:?}", self.manifest_projects[j].entry_key()))
            .collect();
        match &dep.name {
            None => format!(
                "{:?} is listed only as named entries: write one of {}",
                dep.to_string(),
                keys.join(", ")
            ),
            Some(name) => format!(
                "no entry of project {:?} is named {name:?}: its entries are {}",
                dep.project.to_string(),
                keys.join(", ")
            ),
        }
    }
}

/// A drift manager is a name, or a prefix followed by `*` (`kubectl*`). A bare `*` (or a
/// prefix too short to name a tool) would take over every controller's fields, so that an
/// HPA's replicas or an operator's annotations would be removed at every re-sync.
fn check_drift_manager(path: &str, manager: &str) -> Result<(), ConfigError> {
    check_non_empty(path, manager)?;
    let prefix = manager.strip_suffix('*').unwrap_or(manager);
    if prefix.contains('*') {
        return Err(ConfigError::invalid(
            path,
            format!("{manager:?}: '*' may only end a field manager name (a prefix)"),
        ));
    }
    if manager.ends_with('*') && prefix.len() < 3 {
        return Err(ConfigError::invalid(
            path,
            format!(
                "{manager:?} would match the field managers of controllers too: name at least 3 characters before '*'"
            ),
        ));
    }
    Ok(())
}

/// The shortest `reconcile_timeout` or `prune_timeout` accepted: `0s` passed validation and
/// failed every prune that worked ("still present after prune_timeout (0ns)": E14).
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Refuses a timeout under [`MIN_TIMEOUT`] or over [`MAX_TIMEOUT`].
fn check_timeout(path: &str, timeout: Duration) -> Result<(), ConfigError> {
    if timeout < MIN_TIMEOUT {
        return Err(ConfigError::invalid(
            path,
            format!(
                "{} is shorter than the minimum of 1s",
                if timeout.is_zero() {
                    "0s".to_owned()
                } else {
                    format_duration(timeout).to_string()
                }
            ),
        ));
    }
    if timeout <= MAX_TIMEOUT {
        return Ok(());
    }
    Err(ConfigError::invalid(
        path,
        format!(
            "{} is longer than the maximum of {}h (a week)",
            format_duration(timeout),
            MAX_TIMEOUT.as_secs() / 3600
        ),
    ))
}

impl ManifestProject {
    fn validate(&self, base: &str) -> Result<(), ConfigError> {
        self.id.validate(&format!("{base}.id"))?;
        if let Some(name) = &self.name {
            check_entry_name(&format!("{base}.name"), name)?;
        }
        check_namespace(
            &format!("{base}.default_namespace"),
            &self.default_namespace,
        )?;
        if self.paths.len() > MAX_PATHS_PER_PROJECT {
            return Err(ConfigError::invalid(
                format!("{base}.paths"),
                format!(
                    "{} paths, at most {MAX_PATHS_PER_PROJECT} are allowed",
                    self.paths.len()
                ),
            ));
        }
        for (j, p) in self.paths.iter().enumerate() {
            check_non_empty(&format!("{base}.paths[{j}].glob"), &p.glob)?;
            // Matched against paths inside the repository, a `..` component matches nothing:
            // the entry would select no file, and be refused as empty only at the sync.
            if p.glob.split('/').any(|c| c == "..") {
                return Err(ConfigError::invalid(
                    format!("{base}.paths[{j}].glob"),
                    format!(
                        "{:?} has a '..' component: globs select files inside the manifest project, from its root",
                        p.glob
                    ),
                ));
            }
        }
        if let Some(git_ref) = &self.git_ref {
            git_ref.validate(&format!("{base}.ref"))?;
        }
        check_timeout(&format!("{base}.reconcile_timeout"), self.reconcile_timeout)?;
        check_timeout(&format!("{base}.prune_timeout"), self.prune_timeout)?;
        if let Some(post_build) = &self.post_build {
            post_build.validate(&format!("{base}.post_build"))?;
        }
        self.validate_rendering(base)
    }

    /// `kustomize` and `helm` each replace `paths`: a project is plain files, one Kustomize
    /// directory or one chart, so which file produced which object stays unambiguous.
    fn validate_rendering(&self, base: &str) -> Result<(), ConfigError> {
        let renderer = match (&self.kustomize, &self.helm) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    format!("{base}.helm"),
                    "kustomize and helm cannot both be set in one manifest project entry",
                ));
            }
            (Some(k), None) => {
                k.validate(&format!("{base}.kustomize"))?;
                "kustomize"
            }
            (None, Some(h)) => {
                h.validate(&format!("{base}.helm"))?;
                "helm"
            }
            (None, None) => return Ok(()),
        };
        if self.paths != default_paths() {
            return Err(ConfigError::invalid(
                format!("{base}.paths"),
                format!("paths cannot be combined with {renderer}: leave paths out"),
            ));
        }
        Ok(())
    }
}
