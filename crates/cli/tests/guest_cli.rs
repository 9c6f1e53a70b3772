//! `infra.operator guest` as an operator starts it: a public TCP address without a token is
//! refused before anything listens.

use std::process::Command;

#[test]
fn guest_on_a_public_address_without_token_file_refuses_to_start() {
    let ws = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_infra-operator"))
        .args([
            "guest",
            "--pid1",
            "off",
            "--listen",
            "tcp://0.0.0.0:0",
            "--workspace",
        ])
        .arg(ws.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("refusing to listen on tcp://0.0.0.0:0 without a token")
            && err.contains("--token-file"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A token file that cannot be read is an error too, not a silent start without a token.
    let o = Command::new(env!("CARGO_BIN_EXE_infra-operator"))
        .args(["guest", "--pid1", "off", "--listen", "tcp://0.0.0.0:0"])
        .args(["--token-file", "/nonexistent/agent.token", "--workspace"])
        .arg(ws.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("cannot read the token file"), "{err}");
}
