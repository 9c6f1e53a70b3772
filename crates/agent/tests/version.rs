//! The agent binary's command line: the version line the host checks before shipping it, and
//! the seed's `guest` subcommand.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_infra-operator-agent");

#[test]
fn version_carries_the_source_fingerprint_the_host_checks() {
    let o = Command::new(BIN).arg("--version").output().unwrap();
    assert!(o.status.success());
    assert_eq!(
        String::from_utf8(o.stdout).unwrap().trim(),
        format!("infra.operator {}", infra_guest::AGENT_BUILD_VERSION)
    );
}

#[test]
fn guest_subcommand_takes_the_seed_flags() {
    let o = Command::new(BIN)
        .args(["guest", "--help"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let help = String::from_utf8(o.stdout).unwrap();
    for flag in [
        "--port",
        "--listen",
        "--workspace",
        "--token-file",
        "--pid1",
    ] {
        assert!(help.contains(flag), "{flag} missing from: {help}");
    }
}
