//! Admin commands that need no running kas.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn validate(yaml: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["config", "validate"])
        .arg(&file)
        .output()
        .unwrap();
    let text = |b: Vec<u8>| {
        String::from_utf8(b)
            .unwrap()
            .replace(file.to_str().unwrap(), "FILE")
    };
    (out.status.success(), text(out.stdout), text(out.stderr))
}

#[test]
fn config_validate_accepts_a_valid_agent_configuration_and_says_what_is_in_it() {
    let (ok, stdout, stderr) = validate(
        "gitops:\n  manifest_projects:\n  - id: group/app\n    paths:\n    - glob: 'manifests/**/*.yaml'\n\
         ci_access:\n  projects:\n  - id: group/app\n",
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout.trim(),
        "FILE: valid (1 manifest project(s), 1 CI access project(s) and group(s), user access off)"
    );
}

#[test]
fn config_validate_refuses_what_kas_would_refuse_naming_file_key_and_line() {
    let (ok, _, stderr) =
        validate("gitops:\n  manifest_projects:\n  - id: group/app\n    pathz: []\n");
    assert!(!ok);
    assert!(
        stderr.contains("FILE: gitops.manifest_projects[0].pathz"),
        "{stderr}"
    );
    assert!(stderr.contains("unknown key \"pathz\""), "{stderr}");
    assert!(stderr.contains("line 4"), "{stderr}");
    let (ok, _, stderr) = validate("observability:\n  logging:\n    level: loud\n");
    assert!(!ok);
    assert!(stderr.contains("observability.logging.level"), "{stderr}");
}
