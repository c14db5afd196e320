//! `tether-fuzz`: runs the fuzz targets for a while; saves any crashing input.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use sha2::Digest;
use tether_fuzz::{Budget, run, targets};

#[derive(Parser, Debug)]
#[command(name = "tether-fuzz", about = "Fuzz every parser of outside input")]
struct Cli {
    /// Seconds per target.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Only this target (default: all).
    #[arg(long)]
    target: Option<String>,
    /// Seed of the mutation sequence (a run is reproducible from it).
    #[arg(long, default_value_t = 0x7e7e_7e7e)]
    seed: u64,
    /// Where crashing inputs are written.
    #[arg(long, default_value = "target/fuzz/crashes")]
    crash_dir: PathBuf,
}

fn main() -> ExitCode {
    match real_main(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tether-fuzz: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<bool> {
    let budget = Budget {
        iterations: u64::MAX,
        time: Duration::from_secs(cli.seconds),
    };
    let mut clean = true;
    for target in targets::all() {
        if cli.target.as_deref().is_some_and(|t| t != target.name()) {
            continue;
        }
        match run(target.as_ref(), budget, cli.seed) {
            Ok(r) => println!(
                "{}: {} inputs in {} s, {} accepted, corpus {}: no crash",
                target.name(),
                r.iterations,
                cli.seconds,
                r.accepted,
                r.corpus
            ),
            Err(crash) => {
                clean = false;
                std::fs::create_dir_all(&cli.crash_dir)
                    .with_context(|| format!("creating {}", cli.crash_dir.display()))?;
                let name = format!(
                    "{}-{}",
                    crash.target,
                    &hex::encode(sha2::Sha256::digest(&crash.input))[..16]
                );
                let path = cli.crash_dir.join(name);
                std::fs::write(&path, &crash.input)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!(
                    "{}: CRASH ({}); input saved to {} — copy it to crates/fuzz/regressions/{}/ and fix",
                    crash.target,
                    crash.message,
                    path.display(),
                    crash.target
                );
            }
        }
    }
    Ok(clean)
}
