//! `loadgen --replicas` end to end, small: 30 agents over three real kas replicas with real
//! PostgreSQL and Redis; one replica is killed and every agent it held comes back on the others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn agents_spread_over_three_replicas_come_back_after_one_is_killed() {
    let loadgen = std::path::Path::new(env!("CARGO_BIN_EXE_loadgen"));
    // kas is built next to loadgen by the workspace build the test command runs.
    let kas = loadgen.with_file_name("kas");
    assert!(
        kas.is_file(),
        "no kas binary at {} (cargo build -p kas)",
        kas.display()
    );
    let out = Command::new(loadgen)
        .args([
            "-n",
            "30",
            "--replicas",
            "3",
            "--idle-seconds",
            "1",
            "--settle-seconds",
            "0",
        ])
        .args([
            "--config-stream",
            "--kas-log-level",
            "warn",
            "--timeout",
            "60",
        ])
        .arg("--kas-bin")
        .arg(&kas)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap();
    let r: serde_json::Value = serde_json::from_str(last).unwrap();
    let per_replica: Vec<u64> = r["agents_per_replica"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(per_replica.iter().sum::<u64>(), 30, "{r}");
    assert!(
        per_replica.iter().all(|&n| n > 0),
        "spread over all three: {r}"
    );
    let killed = r["killed_replica_agents"].as_u64().unwrap();
    assert_eq!(killed, per_replica[0], "{r}");
    assert_eq!(r["reconnected_agents"].as_u64().unwrap(), killed, "{r}");
    assert!(
        r["redis_commands_per_second_idle"].as_f64().unwrap() > 0.0,
        "{r}"
    );
}
