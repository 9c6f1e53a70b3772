//! Schema snapshot: one JSON example of every message, checked in as `tests/messages.json`.
//!
//! A failure here means the wire format changed. If that is intended, bump
//! `PROTOCOL_VERSION` when older peers would misread it, update `docs/protocol.md`, and
//! regenerate the file with `UPDATE_SNAPSHOT=1 cargo test -p infra-protocol --test schema_snapshot`.

use std::collections::BTreeMap;

use infra_protocol::*;

fn examples() -> Vec<(&'static str, serde_json::Value)> {
    let mut exec = Exec::new("python", "import sys\nprint(sys.stdin.read())\n");
    exec.argv = vec!["--flag".into()];
    exec.stdin = b"hello\n".to_vec();
    exec.env = BTreeMap::from([("GREETING".to_string(), "hi".to_string())]);
    exec.timeout_ms = 5000;
    exec.max_output_bytes = 65536;
    exec.memory_mb = Some(256);
    exec.max_pids = Some(64);
    exec.workdir = Some("project".into());
    let requests = [
        (
            "request.hello",
            RequestBody::Hello(Hello {
                version: PROTOCOL_VERSION,
                client: "infra.operator 0.1.0".into(),
                token: None,
            }),
        ),
        ("request.exec", RequestBody::Exec(exec)),
        (
            "request.put_file",
            RequestBody::PutFile(PutFile {
                path: "project/data.bin".into(),
                data: vec![0, 1, 2, 255],
                mode: 0o644,
                append: false,
            }),
        ),
        (
            "request.get_file",
            RequestBody::GetFile(GetFile {
                path: "project/out.txt".into(),
                offset: 0,
                length: None,
            }),
        ),
        (
            "request.signal",
            RequestBody::Signal(Signal {
                target: 2,
                signal: 15,
            }),
        ),
        (
            "request.shutdown",
            RequestBody::Shutdown(Shutdown { poweroff: true }),
        ),
        // Added after the others, so their ids stay as they were.
        (
            "request.hello_with_token",
            RequestBody::Hello(Hello {
                version: PROTOCOL_VERSION,
                client: "infra.operator 0.1.0".into(),
                token: Some("3f7c9a1e5b2d4c6f8a0b1c2d3e4f5a6b".into()),
            }),
        ),
        (
            "request.put_file_append",
            RequestBody::PutFile(PutFile {
                path: "input/big.bin".into(),
                data: vec![3, 4, 5],
                mode: 0o644,
                append: true,
            }),
        ),
        (
            "request.get_file_range",
            RequestBody::GetFile(GetFile {
                path: "output/result.bin".into(),
                offset: 2_097_152,
                length: Some(2_097_152),
            }),
        ),
        (
            "request.list_files",
            RequestBody::ListFiles(ListFiles {
                path: "output".into(),
                max_entries: 101,
            }),
        ),
        (
            "request.make_dir",
            RequestBody::MakeDir(MakeDir {
                path: "output".into(),
                mode: 0o755,
            }),
        ),
        (
            "request.reseed",
            RequestBody::Reseed(Reseed {
                entropy: vec![7; 16],
                unix_nanos: 1_764_720_000_123_456_789,
            }),
        ),
    ];
    let replies = [
        (
            "reply.hello_reply",
            Reply::HelloReply {
                id: 1,
                version: PROTOCOL_VERSION,
                agent_version: "0.1.0".into(),
                languages: vec!["bash".into(), "python".into()],
                features: vec![FEATURE_FILE_TRANSFER.into()],
            },
        ),
        (
            "reply.stdout",
            Reply::Stdout {
                id: 2,
                data: b"42\n".to_vec(),
            },
        ),
        (
            "reply.stderr",
            Reply::Stderr {
                id: 2,
                data: vec![0xff, 0xfe],
            },
        ),
        (
            "reply.exit",
            Reply::Exit(Exit {
                id: 2,
                status: ExecStatus::Timeout,
                exit_code: Some(124),
                signal: Some(9),
                timed_out: true,
                wall_ms: 5003,
                build_ms: None,
                peak_memory_bytes: Some(10_485_760),
                stdout_truncated: true,
                stderr_truncated: false,
                compile_output: None,
            }),
        ),
        (
            "reply.exit_compile_error",
            Reply::Exit(Exit {
                id: 3,
                status: ExecStatus::CompileError,
                exit_code: Some(1),
                signal: None,
                timed_out: false,
                wall_ms: 0,
                build_ms: Some(120),
                peak_memory_bytes: None,
                stdout_truncated: false,
                stderr_truncated: false,
                compile_output: Some("main.c:1:1: error: expected ';'\n".into()),
            }),
        ),
        (
            "reply.file_data",
            Reply::FileData {
                id: 4,
                data: b"result".to_vec(),
                mode: 0o644,
                size: 6,
            },
        ),
        (
            "reply.file_list",
            Reply::FileList {
                id: 7,
                entries: vec![
                    FileEntry {
                        path: "result.txt".into(),
                        size: 6,
                        mode: 0o644,
                    },
                    FileEntry {
                        path: "sub/b.bin".into(),
                        size: 5_242_880,
                        mode: 0o600,
                    },
                ],
                truncated: false,
            },
        ),
        ("reply.ok", Reply::Ok { id: 5 }),
        (
            "reply.error",
            Reply::Error {
                id: Some(6),
                code: ErrorCode::PathRefused,
                message: "path must be relative to the workspace: /etc/passwd".into(),
            },
        ),
        (
            "reply.error_unauthorized",
            Reply::Error {
                id: Some(1),
                code: ErrorCode::Unauthorized,
                message: "this listener requires a token in hello".into(),
            },
        ),
        (
            "reply.error_unattributed",
            Reply::Error {
                id: None,
                code: ErrorCode::BadFrame,
                message: "frame is not valid JSON".into(),
            },
        ),
    ];
    let mut out = Vec::new();
    for (i, (name, body)) in requests.into_iter().enumerate() {
        let req = Request {
            id: i as u64 + 1,
            body,
        };
        out.push((name, serde_json::to_value(&req).unwrap()));
    }
    for (name, reply) in replies {
        out.push((name, serde_json::to_value(&reply).unwrap()));
    }
    out
}

fn snapshot_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/messages.json")
}

fn render() -> String {
    let map: serde_json::Map<String, serde_json::Value> = examples()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let doc = serde_json::json!({
        "protocol_version": PROTOCOL_VERSION,
        "max_frame": MAX_FRAME,
        "messages": map,
    });
    serde_json::to_string_pretty(&doc).unwrap() + "\n"
}

#[test]
fn wire_format_matches_snapshot() {
    let now = render();
    if std::env::var_os("UPDATE_SNAPSHOT").is_some() {
        std::fs::write(snapshot_path(), &now).unwrap();
        return;
    }
    let stored = std::fs::read_to_string(snapshot_path()).expect("tests/messages.json exists");
    assert_eq!(
        stored, now,
        "wire format changed; see the comment at the top of this file"
    );
}

#[test]
fn snapshot_examples_decode_back() {
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(snapshot_path()).unwrap()).unwrap();
    let msgs = stored["messages"].as_object().unwrap();
    let mut seen_req = std::collections::BTreeSet::new();
    let mut seen_rep = std::collections::BTreeSet::new();
    for (name, value) in msgs {
        let body = serde_json::to_vec(value).unwrap();
        let ty = value["type"].as_str().unwrap().to_string();
        if name.starts_with("request.") {
            let r = Request::decode(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(serde_json::to_value(&r).unwrap(), *value, "{name}");
            seen_req.insert(ty);
        } else {
            let r = Reply::decode(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(serde_json::to_value(&r).unwrap(), *value, "{name}");
            seen_rep.insert(ty);
        }
    }
    let all_req: std::collections::BTreeSet<String> =
        Request::TYPES.iter().map(|s| s.to_string()).collect();
    let all_rep: std::collections::BTreeSet<String> =
        Reply::TYPES.iter().map(|s| s.to_string()).collect();
    assert_eq!(seen_req, all_req, "every request type has an example");
    assert_eq!(seen_rep, all_rep, "every reply type has an example");
}
