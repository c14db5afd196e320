//! What a binary was built from: shown by `--version`, and in images' labels.

/// The crate version, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The Git commit (12 hex digits), `TETHER_COMMIT` when set at build time, or `unknown`.
pub const COMMIT: &str = env!("TETHER_COMMIT");

/// `--version`'s text: `0.1.0 (commit 0123456789ab)`.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TETHER_COMMIT"),
    ")"
);

/// The version with the commit as SemVer build metadata, `0.1.0+0123456789ab`: what agentk
/// tells kas (shown in `kas agent list`), so agents built from different commits of one
/// version tell apart during a rollout.
pub const BUILD_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+", env!("TETHER_COMMIT"));

#[cfg(test)]
mod tests {
    #[test]
    fn long_version_names_version_and_commit() {
        assert!(super::LONG_VERSION.starts_with(super::VERSION));
        assert!(super::LONG_VERSION.contains(super::COMMIT));
        assert!(!super::COMMIT.is_empty());
        assert_eq!(
            super::BUILD_VERSION,
            format!("{}+{}", super::VERSION, super::COMMIT)
        );
    }
}
