//! The fuzz targets in the test suite: every input that ever crashed one
//! (`crates/fuzz/regressions/<target>/`) replayed, then a short deterministic pass.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tether_fuzz::{Budget, check, run, targets};

#[test]
fn every_target_survives_a_short_run() {
    let budget = Budget {
        iterations: 20_000,
        time: Duration::from_secs(20),
    };
    for target in targets::all() {
        replay_regressions(target.as_ref());
        let report = run(target.as_ref(), budget, 42)
            .unwrap_or_else(|c| panic!("{} crashed: {} on {:?}", c.target, c.message, c.input));
        assert!(report.iterations > 0, "{}", target.name());
        // The seeds are valid inputs: a target that accepts none of them tests nothing deep.
        assert!(
            target
                .seeds()
                .iter()
                .any(|s| check(target.as_ref(), s).unwrap()),
            "{}: no seed is accepted",
            target.name()
        );
    }
}

/// Every input that ever crashed `target` (`crates/fuzz/regressions/<target>/`, one file each)
/// must not crash it again.
fn replay_regressions(target: &dyn tether_fuzz::targets::Target) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target.name());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in entries {
        let path = e.unwrap().path();
        let input = std::fs::read(&path).unwrap();
        if let Err(c) = check(target, &input) {
            panic!("{} crashes again: {}", path.display(), c.message);
        }
    }
}
