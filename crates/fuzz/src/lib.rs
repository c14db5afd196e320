//! Fuzzing of every parser that takes input from outside kas or agentk, on stable Rust.
//!
//! No nightly toolchain (and so no `cargo fuzz`/libFuzzer) can be installed here, so this is a
//! small harness of our own: each [`targets::Target`] is fed mutations ([`mutate`]) of its
//! seeds and of every input it accepted before, under `catch_unwind`. A panic is a crash: the
//! input is returned so the caller can save it and turn it into a regression test
//! (`crates/fuzz/regressions/<target>/`, replayed by `cargo test`). `scripts/fuzz` runs each
//! target for ten minutes; the test suite runs a short, deterministic pass.

pub mod mutate;
pub mod targets;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use mutate::{Rng, mutate};
use targets::Target;

/// Inputs longer than this are cut: parsers have their own size limits upstream, and long
/// inputs only slow the search down.
pub const MAX_INPUT: usize = 64 * 1024;

/// Accepted inputs kept to mutate further (a bounded corpus keeps memory flat over hours).
const MAX_CORPUS: usize = 512;

/// How long a run lasts: whichever bound comes first.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub iterations: u64,
    pub time: Duration,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub iterations: u64,
    pub accepted: u64,
    pub corpus: usize,
}

/// An input that made a parser panic.
#[derive(Debug, Clone)]
pub struct Crash {
    pub target: &'static str,
    pub input: Vec<u8>,
    pub message: String,
}

/// Runs `target` within `budget`, mutating from `seed`; stops at the first crash.
pub fn run(target: &dyn Target, budget: Budget, seed: u64) -> Result<Report, Crash> {
    let mut corpus = target.seeds();
    for s in corpus.clone() {
        check(target, &s)?;
    }
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut report = Report {
        iterations: 0,
        accepted: 0,
        corpus: corpus.len(),
    };
    while report.iterations < budget.iterations && started.elapsed() < budget.time {
        let base = &corpus[rng.below(corpus.len())];
        let other = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, base, other, MAX_INPUT);
        report.iterations += 1;
        if check(target, &input)? {
            report.accepted += 1;
            if corpus.len() < MAX_CORPUS {
                corpus.push(input);
            } else {
                let slot = rng.below(MAX_CORPUS);
                corpus[slot] = input;
            }
        }
    }
    report.corpus = corpus.len();
    Ok(report)
}

/// One input through the target: whether it was accepted, or the crash.
pub fn check(target: &dyn Target, input: &[u8]) -> Result<bool, Crash> {
    catch_unwind(AssertUnwindSafe(|| target.run(input))).map_err(|panic| Crash {
        target: target.name(),
        input: input.to_vec(),
        message: panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_else(|| "panic".into()),
    })
}
