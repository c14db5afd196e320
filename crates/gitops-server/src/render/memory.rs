//! Fitting the renderers into kas's own memory limit.
//!
//! Renderers are kas's children and stay in its cgroup, so their memory counts against the
//! container's limit. `max_concurrent` renderers with `memory_limit` of address space each,
//! plus kas itself, over that limit make the cgroup's OOM killer end the whole container (every
//! agent's stream) instead of one rendering failing with "over its memory limit". kas reads
//! its cgroup's limit at start ([`cgroup_memory_limit`]) and [`fit`]s the settings into it.

use std::path::{Path, PathBuf};

/// What kas keeps for itself beside its renderers by default (`gitops.render.memory_reserve`):
/// its streams, mirrors' handles and the render cache (`cache_entries` × `max_output_size`,
/// 320 MiB at the defaults, is a worst case few installations reach).
pub const DEFAULT_RESERVE: u64 = 512 << 20;

/// The least address space kas lowers a renderer's limit to: Go programs (kustomize, helm)
/// need ~0.8 GiB of address space just to start, so less only turns every rendering into a
/// memory-limit failure.
pub const MIN_RENDERER_MEMORY: u64 = 1 << 30;

/// From here up a cgroup v1 `memory.limit_in_bytes` means "no limit" (the kernel shows its
/// largest page count in bytes, 9223372036854771712).
const V1_UNLIMITED: u64 = 1 << 62;

/// The renderers' share of memory: each one's address space and how many run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderMemory {
    /// `gitops.render.memory_limit`, in bytes.
    pub memory_limit: u64,
    /// `gitops.render.max_concurrent`.
    pub max_concurrent: usize,
}

impl RenderMemory {
    /// The most all renderers together may take.
    fn total(&self) -> u64 {
        let n = u64::try_from(self.max_concurrent).unwrap_or(u64::MAX);
        n.saturating_mul(self.memory_limit)
    }
}

/// The settings kas runs with, and why they differ from the configured ones if they do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fitted {
    /// What the renderers get.
    pub effective: RenderMemory,
    /// What was lowered and why, for a warning; `None`: as configured.
    pub lowered: Option<String>,
}

/// No sensible setting fits: kas refuses to start rather than be OOM-killed by its first
/// renderings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "kas's memory limit ({} MiB) minus gitops.render.memory_reserve ({} MiB) leaves {} MiB for renderers, less than one renderer needs ({} MiB: gitops.render.memory_limit, at most {} MiB, which Go programs need to start): raise the container's memory limit (the Helm chart's resources.limits.memory) or lower gitops.render.memory_reserve",
    mib(*cgroup_limit), mib(*reserve), mib(*left), mib(*needed), mib(MIN_RENDERER_MEMORY)
)]
pub struct NothingFits {
    /// The cgroup's limit.
    pub cgroup_limit: u64,
    /// `gitops.render.memory_reserve`.
    pub reserve: u64,
    /// What is left for renderers.
    pub left: u64,
    /// The least one renderer gets.
    pub needed: u64,
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// The renderers' settings fitted into `cgroup_limit` (kas's memory limit; `None`: none)
/// beside `reserve` for kas itself.
///
/// Fewer renderers at once come first: each keeps the address space it was configured with,
/// so what renders today still renders. Only when not even one fits is one renderer given
/// less (all that is left, down to [`MIN_RENDERER_MEMORY`] or the configured limit if that is
/// smaller); below that, nothing fits.
pub fn fit(
    configured: RenderMemory,
    reserve: u64,
    cgroup_limit: Option<u64>,
) -> Result<Fitted, NothingFits> {
    let as_configured = Fitted {
        effective: configured,
        lowered: None,
    };
    let Some(cgroup_limit) = cgroup_limit else {
        return Ok(as_configured);
    };
    let left = cgroup_limit.saturating_sub(reserve);
    if configured.total() <= left {
        return Ok(as_configured);
    }
    let over = format!(
        "gitops.render.max_concurrent ({}) × memory_limit ({} MiB) + memory_reserve ({} MiB) is over kas's memory limit ({} MiB), so renderings at once would get the whole container OOM-killed",
        configured.max_concurrent,
        mib(configured.memory_limit),
        mib(reserve),
        mib(cgroup_limit)
    );
    let fitting = left / configured.memory_limit.max(1);
    if fitting >= 1 {
        let max_concurrent = usize::try_from(fitting).unwrap_or(usize::MAX);
        return Ok(Fitted {
            effective: RenderMemory {
                max_concurrent,
                ..configured
            },
            lowered: Some(format!(
                "{over}: running at most {max_concurrent} at once instead"
            )),
        });
    }
    let needed = configured.memory_limit.min(MIN_RENDERER_MEMORY);
    if left < needed {
        return Err(NothingFits {
            cgroup_limit,
            reserve,
            left,
            needed,
        });
    }
    Ok(Fitted {
        effective: RenderMemory {
            memory_limit: left,
            max_concurrent: 1,
        },
        lowered: Some(format!(
            "{over}, and not even one renderer fits: running one at a time with a memory_limit of {} MiB instead",
            mib(left)
        )),
    })
}

/// kas's cgroup memory limit: the smallest limit of its cgroup and of those above it that this
/// container shows, cgroup v2 (`memory.max`) or v1 (`memory.limit_in_bytes`); `None` when
/// there is none or it cannot be read (blocking: reads a few files).
pub fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    limit_files(&own, Path::new("/sys/fs/cgroup"))
        .iter()
        .filter_map(|file| std::fs::read_to_string(file).ok())
        .filter_map(|text| parse_limit(&text))
        .min()
}

/// The files that may hold a memory limit of the cgroups in `own` (`/proc/self/cgroup`), from
/// the process's own cgroup up to the hierarchy's mount under `root`. In a container with its
/// own cgroup namespace the path is `/` and the mount is its cgroup; without one, the host's
/// path is shown, and only its existing ancestors are read.
fn limit_files(own: &str, root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for line in own.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (mount, file) = if id == "0" && controllers.is_empty() {
            (root.to_path_buf(), "memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else {
            continue;
        };
        let relative = Path::new(path.trim_start_matches('/'));
        files.extend(relative.ancestors().map(|dir| mount.join(dir).join(file)));
    }
    files
}

/// A limit file's value; `None` for no limit (`max`, v1's huge number) or unreadable text.
fn parse_limit(text: &str) -> Option<u64> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|bytes| *bytes < V1_UNLIMITED)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn memory(memory_limit: u64, max_concurrent: usize) -> RenderMemory {
        RenderMemory {
            memory_limit,
            max_concurrent,
        }
    }

    #[test]
    fn without_a_cgroup_limit_or_within_it_the_settings_stay_as_configured() {
        let defaults = memory(2 * GIB, 4);
        for limit in [None, Some(8 * GIB + 512 * MIB), Some(64 * GIB)] {
            let fitted = fit(defaults, DEFAULT_RESERVE, limit).expect("fits");
            assert_eq!(fitted.effective, defaults, "{limit:?}");
            assert_eq!(fitted.lowered, None, "{limit:?}");
        }
    }

    #[test]
    fn over_the_limit_fewer_renderers_run_at_once_each_keeping_its_memory() {
        let fitted = fit(memory(2 * GIB, 4), DEFAULT_RESERVE, Some(5 * GIB)).expect("fits");
        assert_eq!(fitted.effective, memory(2 * GIB, 2));
        let why = fitted.lowered.expect("a warning");
        assert!(
            why.contains("max_concurrent (4) × memory_limit (2048 MiB) + memory_reserve (512 MiB) is over kas's memory limit (5120 MiB)"),
            "{why}"
        );
        assert!(why.ends_with("running at most 2 at once instead"), "{why}");
    }

    /// The old chart: a 1 GiB container and 2 GiB renderers. Not one fits, and what is left
    /// (512 MiB) is too little for a Go program to start.
    #[test]
    fn when_not_one_renderer_fits_one_gets_what_is_left_or_kas_refuses_to_start() {
        let fitted = fit(memory(2 * GIB, 4), DEFAULT_RESERVE, Some(2 * GIB)).expect("fits");
        assert_eq!(fitted.effective, memory(GIB + 512 * MIB, 1));
        let why = fitted.lowered.expect("a warning");
        assert!(why.contains("memory_limit of 1536 MiB"), "{why}");

        let refused = fit(memory(2 * GIB, 4), DEFAULT_RESERVE, Some(GIB)).expect_err("refused");
        assert_eq!(refused.left, 512 * MIB);
        assert_eq!(refused.needed, MIN_RENDERER_MEMORY);
        let text = refused.to_string();
        for setting in [
            "gitops.render.memory_reserve",
            "gitops.render.memory_limit",
            "resources.limits.memory",
        ] {
            assert!(text.contains(setting), "{text} names {setting}");
        }
        // A reserve over the whole limit leaves nothing, without overflowing.
        assert!(fit(memory(GIB, 1), 4 * GIB, Some(GIB)).is_err());
    }

    /// An operator's deliberately small renderer limit is the least kas lowers to.
    #[test]
    fn a_configured_limit_under_the_minimum_is_the_floor() {
        let fitted = fit(memory(512 * MIB, 2), 256 * MIB, Some(768 * MIB)).expect("fits");
        assert_eq!(fitted.effective, memory(512 * MIB, 1));
        assert!(fit(memory(512 * MIB, 1), 512 * MIB, Some(768 * MIB)).is_err());
    }

    #[test]
    fn limit_files_cover_v2_and_v1_from_the_own_cgroup_up() {
        let root = Path::new("/sys/fs/cgroup");
        let v2 = limit_files("0::/\n", root);
        assert_eq!(v2, [root.join("memory.max")]);
        let host = limit_files("0::/kubepods/pod1/c1\n", root);
        assert_eq!(
            host,
            [
                root.join("kubepods/pod1/c1/memory.max"),
                root.join("kubepods/pod1/memory.max"),
                root.join("kubepods/memory.max"),
                root.join("memory.max"),
            ]
        );
        let v1 = limit_files(
            "5:cpuacct,cpu:/x\n4:memory:/pod/c\n1:name=systemd:/\n",
            root,
        );
        let mem = root.join("memory");
        assert_eq!(
            v1,
            [
                mem.join("pod/c/memory.limit_in_bytes"),
                mem.join("pod/memory.limit_in_bytes"),
                mem.join("memory.limit_in_bytes"),
            ]
        );
    }

    #[test]
    fn max_and_v1_unlimited_mean_no_limit() {
        assert_eq!(parse_limit("1073741824\n"), Some(GIB));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit(""), None);
    }
}
