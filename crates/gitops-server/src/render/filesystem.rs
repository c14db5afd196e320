//! The renderer's filesystem confinement: `kas render-confine` restricts the renderer with
//! Landlock to reading the system's programs and libraries, TLS roots and the checkout, and to
//! writing its scratch folder, before it executes it.
//!
//! kas's secrets are files a renderer could otherwise read as kas's user: the admin token and
//! the database under `data_dir`, the TLS key, the database URL and the peers' secret the Helm
//! chart mounts under `/etc/kas`, and other projects' Git mirrors. Kustomize's load restrictor
//! and the reference checks refuse the ways they know of; this holds for the ones they do not.
//! Landlock needs no privilege, only `no_new_privs`; where the kernel lacks it, the renderer
//! runs without it (kas says so once at startup).

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    path_beneath_rules,
};

/// The Landlock ABI whose rights are asked for (Linux 6.10: reads, writes, renames across
/// folders, truncation, device ioctls); older kernels enforce what they know of.
const LANDLOCK_ABI: ABI = ABI::V5;

/// What every renderer may read (and execute): programs, libraries and the loader's cache,
/// TLS roots, time zones, user names. Not `/etc` as a whole: the Helm chart mounts kas's TLS
/// key, database URL and secrets under `/etc/kas`.
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/dev/urandom",
    "/dev/random",
];

/// What every renderer may write: where programs throw output away.
const SYSTEM_WRITE: &[&str] = &["/dev/null"];

/// The files and folders a renderer may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// Read and executed (with what is beneath).
    pub read: Vec<PathBuf>,
    /// Read, written, created and removed (with what is beneath).
    pub write: Vec<PathBuf>,
}

/// What the renderer `program` (and `resolved`, where it is a link to) may reach: the system's
/// files, the program itself (not its folder: an operator may keep it beside kas's data), and
/// `read` and `write` as given by kas (the checkout, its scratch folder).
pub fn fence(
    program: &Path,
    resolved: Option<&Path>,
    read: &[PathBuf],
    write: &[PathBuf],
) -> Fence {
    let system = |paths: &[&str]| paths.iter().map(PathBuf::from).collect::<Vec<_>>();
    let mut readable = system(SYSTEM_READ);
    readable.push(program.to_path_buf());
    readable.extend(resolved.map(Path::to_path_buf));
    readable.extend(read.iter().cloned());
    let mut writable = system(SYSTEM_WRITE);
    writable.extend(write.iter().cloned());
    Fence {
        read: readable,
        write: writable,
    }
}

/// Whether the kernel enforces the fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforced {
    /// Every right asked for.
    Fully,
    /// The rights this kernel's Landlock knows of.
    Partly,
    /// Not at all: no Landlock in this kernel (or it is disabled).
    No,
}

/// Restricts the calling thread, and what it executes, to `fence`. Paths that do not exist
/// are left out (a system without `/lib64`).
pub fn restrict(fence: &Fence) -> Result<Enforced, landlock::RulesetError> {
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))?
        .create()?
        .add_rules(path_beneath_rules(
            &fence.read,
            AccessFs::from_read(LANDLOCK_ABI),
        ))?
        .add_rules(path_beneath_rules(
            &fence.write,
            AccessFs::from_all(LANDLOCK_ABI),
        ))?
        .restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforced::Fully,
        RulesetStatus::PartiallyEnforced => Enforced::Partly,
        _ => Enforced::No,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_holds_the_system_the_program_and_what_kas_gives_and_not_etc() {
        let f = fence(
            Path::new("/opt/tools/helm"),
            Some(Path::new("/opt/helm-3/helm")),
            &[PathBuf::from("/w/c/repo")],
            &[PathBuf::from("/w/c/scratch")],
        );
        for p in [
            "/usr",
            "/etc/ssl",
            "/opt/tools/helm",
            "/opt/helm-3/helm",
            "/w/c/repo",
        ] {
            assert!(f.read.contains(&PathBuf::from(p)), "{p} readable");
        }
        assert!(
            !f.read.contains(&PathBuf::from("/opt/tools")),
            "not the program's folder"
        );
        assert!(
            !f.read
                .iter()
                .any(|p| p == Path::new("/etc") || p == Path::new("/"))
        );
        assert_eq!(
            f.write,
            [PathBuf::from("/dev/null"), PathBuf::from("/w/c/scratch")]
        );
    }
}
