//! Manifest path globs with doublestar semantics, as upstream (bmatcuk/doublestar) matches them.
//!
//! - `*` and `?` never cross `/`; `**` as a whole path segment matches zero or more directories.
//! - `{a,b}` alternatives (not nested), `[...]` classes (`[!...]` / `[^...]` negate), `\` escapes.
//! - A glob is always relative to the repository root; a leading `/` only says so and is dropped.
//! - Files inside dot-directories (`.gitlab/...`, `a/.hidden/x.yaml`) never match, whatever the
//!   glob says: upstream skips hidden directories while walking, and they hold CI and agent
//!   configuration, not manifests.

use std::fmt;

use globset::{GlobBuilder, GlobMatcher};

/// Characters that make a path segment a pattern rather than a literal name. `\` is included
/// because an escaped character is still pattern syntax that must not reach a tree lookup as-is.
const META: &[char] = &['*', '?', '[', ']', '{', '}', '\\'];

/// A glob from `paths[].glob` that is not valid; reported to the user as a config error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid glob {glob:?}: {reason}")]
pub struct InvalidGlob {
    /// The glob as written in the configuration.
    pub glob: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A compiled manifest glob.
#[derive(Clone)]
pub struct ManifestGlob {
    source: String,
    prefix: String,
    matcher: GlobMatcher,
}

impl fmt::Debug for ManifestGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManifestGlob")
            .field("glob", &self.source)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl ManifestGlob {
    /// Compiles `glob`, failing with a message that names it.
    pub fn new(glob: &str) -> Result<ManifestGlob, InvalidGlob> {
        let invalid = |reason: String| InvalidGlob {
            glob: glob.to_owned(),
            reason,
        };
        let pattern = strip_root(glob);
        if pattern.is_empty() {
            return Err(invalid("the glob is empty".to_owned()));
        }
        // Paths from a Git tree never have empty, `.` or `..` segments, so such a glob could
        // never match; saying so beats a silently empty selection. It also keeps the literal
        // prefix acceptable to `Mirror::list_files`, which rejects those segments.
        if pattern.ends_with('/') {
            return Err(invalid(
                "a glob must name files, it must not end with '/'; append '**' to select a whole directory"
                    .to_owned(),
            ));
        }
        if pattern.split('/').any(|s| s.is_empty()) {
            return Err(invalid("empty path segment ('//')".to_owned()));
        }
        if pattern.split('/').any(|s| s == "." || s == "..") {
            return Err(invalid(
                "'.' and '..' segments are not allowed; globs are relative to the repository root"
                    .to_owned(),
            ));
        }
        let compiled = doublestar(pattern)
            .build()
            .map_err(|e| invalid(e.kind().to_string()))?;
        Ok(ManifestGlob {
            source: glob.to_owned(),
            prefix: literal_prefix(glob).to_owned(),
            matcher: compiled.compile_matcher(),
        })
    }

    /// The glob as written in the configuration.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The directory to list for this glob; see [`literal_prefix`].
    pub fn literal_prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the file at `path` (from the repository root, `/`-separated, no leading `/`) is
    /// selected by this glob.
    pub fn is_match(&self, path: &str) -> bool {
        !in_dot_directory(path) && self.matcher.is_match(path)
    }

    /// Whether this glob could select a file somewhere under the directory `dir` (a submodule,
    /// whose files kas does not have): its segments, `**` taking any number, consume every
    /// segment of `dir` and leave at least one (a file name) over. A segment that does not
    /// compile alone (an alternative spanning `/`) is taken to match: the answer errs towards
    /// "could".
    pub fn could_match_under(&self, dir: &str) -> bool {
        if in_dot_directory(&format!("{dir}/x")) {
            return false;
        }
        let segments: Vec<&str> = strip_root(&self.source).split('/').collect();
        let matches = |i: usize, name: &str| {
            doublestar(segments[i])
                .build()
                .map_or(true, |g| g.compile_matcher().is_match(name))
        };
        // The glob segments reachable before the next directory segment; `**` may match none.
        let closure = |mut states: Vec<usize>| {
            let mut i = 0;
            while i < states.len() {
                let s = states[i];
                if segments.get(s) == Some(&"**") && !states.contains(&(s + 1)) {
                    states.push(s + 1);
                }
                i += 1;
            }
            states
        };
        let mut states = closure(vec![0]);
        for name in dir.split('/') {
            let mut next = Vec::new();
            for &s in &states {
                let Some(&segment) = segments.get(s) else {
                    continue;
                };
                if segment == "**" {
                    next.push(s);
                } else if matches(s, name) {
                    next.push(s + 1);
                }
            }
            next.sort_unstable();
            next.dedup();
            states = closure(next);
        }
        states.iter().any(|&s| s < segments.len())
    }
}

impl fmt::Display for ManifestGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// The longest leading run of whole directory segments of `glob` without glob syntax, without
/// the leading `/`: the only subtree that can hold matches, so the only one worth listing.
///
/// The last segment is never part of it even when literal, because it names files, not a
/// directory: `/manifests/*.{yaml,yml,json}` → `manifests`, `**/*.yaml` → ``,
/// `a/b/**/c/*.yml` → `a/b`, `a/app.yaml` → `a`.
pub fn literal_prefix(glob: &str) -> &str {
    let pattern = strip_root(glob);
    let mut end = 0;
    let mut start = 0;
    // Only segments followed by a `/` are directories.
    while let Some(rel) = pattern[start..].find('/') {
        let segment = &pattern[start..start + rel];
        if segment.contains(META) {
            break;
        }
        end = start + rel;
        start = end + 1;
    }
    &pattern[..end]
}

/// Whether any directory of `path` (every segment but the last) starts with `.`.
pub fn in_dot_directory(path: &str) -> bool {
    match path.rsplit_once('/') {
        Some((dirs, _file)) => dirs.split('/').any(|d| d.starts_with('.')),
        None => false,
    }
}

/// A globset builder of `pattern` with doublestar's semantics.
fn doublestar(pattern: &str) -> GlobBuilder<'_> {
    let mut builder = GlobBuilder::new(pattern);
    builder
        .literal_separator(true)
        // Set explicitly: globset's default depends on the platform, doublestar's does not.
        .backslash_escape(true)
        // doublestar accepts `{a,}`; globset only does with this option.
        .empty_alternates(true);
    builder
}

fn strip_root(glob: &str) -> &str {
    glob.strip_prefix('/').unwrap_or(glob)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(g: &str) -> ManifestGlob {
        match ManifestGlob::new(g) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn doublestar_semantics() {
        // (glob, path, matches)
        let table: &[(&str, &str, bool)] = &[
            ("*.yaml", "x.yaml", true),
            ("*.yaml", "a/b.yaml", false),
            ("*.yaml", "x.yml", false),
            ("**/*.yaml", "x.yaml", true),
            ("**/*.yaml", "a/b/c.yaml", true),
            ("**/*.yaml", "a/b/c.yml", false),
            ("**", "a/b/c.txt", true),
            ("manifests/**", "manifests/a.yaml", true),
            ("manifests/**", "manifests/x/y/z.json", true),
            ("manifests/**", "other/a.yaml", false),
            ("manifests/**/*.yaml", "manifests/a.yaml", true),
            ("manifests/**/*.yaml", "manifests/x/y/a.yaml", true),
            ("a/**/b/*.yml", "a/b/x.yml", true),
            ("a/**/b/*.yml", "a/1/2/b/x.yml", true),
            ("a/**/b/*.yml", "a/1/2/c/x.yml", false),
            ("{a,b}/*.yml", "a/x.yml", true),
            ("{a,b}/*.yml", "b/x.yml", true),
            ("{a,b}/*.yml", "c/x.yml", false),
            ("{a,b}/*.yml", "a/sub/x.yml", false),
            ("m/*.{yaml,yml,json}", "m/x.json", true),
            ("m/*.{yaml,yml,json}", "m/x.txt", false),
            ("m/x.{yaml,}", "m/x.", true),
            ("?.yaml", "a.yaml", true),
            ("?.yaml", "ab.yaml", false),
            ("a?b.yaml", "a/b.yaml", false),
            ("app-[0-9].yaml", "app-7.yaml", true),
            ("app-[0-9].yaml", "app-x.yaml", false),
            ("app-[!0-9].yaml", "app-x.yaml", true),
            ("app-[!0-9].yaml", "app-7.yaml", false),
            ("app-[^0-9].yaml", "app-x.yaml", true),
            ("/manifests/*.yaml", "manifests/a.yaml", true),
            ("/*.yaml", "a.yaml", true),
            ("/*.yaml", "a/b.yaml", false),
            ("a\\*.yaml", "a*.yaml", true),
            ("a\\*.yaml", "ab.yaml", false),
            ("Manifests/*.yaml", "manifests/a.yaml", false),
            // Dot-directories never match, even when the glob names them literally.
            ("**/*.yaml", ".gitlab/agents/x/config.yaml", false),
            ("**/*.yaml", "a/.hidden/x.yaml", false),
            (".gitlab/**", ".gitlab/ci.yml", false),
            // A dot-file is not a dot-directory: the glob decides (doublestar's `*` matches it).
            ("**/*.yaml", "a/.x.yaml", true),
        ];
        for (g, path, want) in table {
            assert_eq!(glob(g).is_match(path), *want, "glob {g:?} vs {path:?}");
        }
    }

    #[test]
    fn literal_prefixes() {
        let table = [
            ("/manifests/*.{yaml,yml,json}", "manifests"),
            ("manifests/*.{yaml,yml,json}", "manifests"),
            ("**/*.yaml", ""),
            ("*.yaml", ""),
            ("/*.yaml", ""),
            ("a/b/**/c/*.yml", "a/b"),
            ("a/app.yaml", "a"),
            ("a/b/c", "a/b"),
            ("manifests/**", "manifests"),
            ("{a,b}/*.yml", ""),
            ("a/[xy]/*.yml", "a"),
            ("a/x?/*.yml", "a"),
            ("a/x\\*/*.yml", "a"),
        ];
        for (g, want) in table {
            assert_eq!(literal_prefix(g), want, "{g:?}");
            assert_eq!(glob(g).literal_prefix(), want, "{g:?}");
        }
    }

    #[test]
    fn invalid_globs_name_the_glob() {
        for g in [
            "manifests/[a-",
            "manifests/*.{yaml,yml",
            "",
            "/",
            "manifests/",
            "a//b.yaml",
            "../x.yaml",
            "a/./b.yaml",
        ] {
            match ManifestGlob::new(g) {
                Ok(m) => panic!("{g:?} compiled: {m:?}"),
                Err(e) => {
                    assert_eq!(e.glob, g);
                    assert!(e.to_string().contains(&format!("{g:?}")), "{e}");
                    assert!(!e.reason.is_empty());
                }
            }
        }
    }

    #[test]
    fn globs_that_could_select_files_under_a_directory() {
        // (glob, directory, could)
        let table: &[(&str, &str, bool)] = &[
            ("**/*.yaml", "vendor/lib", true),
            ("manifests/**", "manifests/lib", true),
            ("manifests/**/*.yaml", "manifests/a/b", true),
            ("manifests/*/*.yaml", "manifests/lib", true),
            ("manifests/*/*.yaml", "manifests/lib/deeper", false),
            ("manifests/*.yaml", "manifests/lib", false),
            ("*.yaml", "lib", false),
            ("other/**", "manifests/lib", false),
            ("{a,b}/*.yml", "b", true),
            ("{a,b}/*.yml", "c", false),
            ("/manifests/lib/x.yaml", "manifests/lib", true),
            ("**/*.yaml", "a/.hidden", false),
        ];
        for (g, dir, want) in table {
            assert_eq!(
                glob(g).could_match_under(dir),
                *want,
                "glob {g:?} under {dir:?}"
            );
        }
    }

    #[test]
    fn dot_directories() {
        assert!(in_dot_directory(".gitlab/x.yaml"));
        assert!(in_dot_directory("a/.b/c/x.yaml"));
        assert!(!in_dot_directory(".x.yaml"));
        assert!(!in_dot_directory("a/.x.yaml"));
        assert!(!in_dot_directory("a/b.c/x.yaml"));
    }
}
