//! Agent tests over TCP on the host (no VM). They run as root, so programs run as `nobody`.
//! No assertion depends on timing: a timeout test checks the status and that no process of
//! the killed group is left.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use infra_guest::{parse_listen, Agent, AgentOptions, Pid1Mode};
use infra_protocol::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

struct Harness {
    ws: tempfile::TempDir,
    addr: std::net::SocketAddr,
    languages: Vec<String>,
}

async fn start() -> Harness {
    start_with(false).await
}

/// An agent whose workspace belongs to the run-as user when `for_run_as` (as in a VM).
async fn start_with(for_run_as: bool) -> Harness {
    let ws = tempfile::tempdir().unwrap();
    let opts = AgentOptions {
        listen: vec![parse_listen("tcp://127.0.0.1:0").unwrap()],
        workspace: ws.path().to_path_buf(),
        workspace_for_run_as: for_run_as,
        pid1: Pid1Mode::Off,
        ..AgentOptions::default()
    };
    let agent = Agent::bind(opts).await.unwrap();
    let addr = agent.tcp_addr().unwrap();
    let languages = agent.languages().to_vec();
    tokio::spawn(agent.serve());
    Harness {
        ws,
        addr,
        languages,
    }
}

struct Client {
    s: TcpStream,
    next: u64,
}

impl Client {
    async fn connect(h: &Harness) -> Client {
        let mut c = Client {
            s: TcpStream::connect(h.addr).await.unwrap(),
            next: 100,
        };
        let id = c
            .send(RequestBody::Hello(Hello {
                version: PROTOCOL_VERSION,
                client: "test".into(),
                token: None,
            }))
            .await;
        match c.recv().await {
            Reply::HelloReply {
                id: rid, version, ..
            } => {
                assert_eq!(rid, id);
                assert_eq!(version, PROTOCOL_VERSION);
            }
            other => panic!("expected hello_reply, got {other:?}"),
        }
        c
    }

    async fn send(&mut self, body: RequestBody) -> u64 {
        self.next += 1;
        let id = self.next;
        write_message_async(&mut self.s, &Request { id, body })
            .await
            .unwrap();
        id
    }

    async fn recv(&mut self) -> Reply {
        read_message_async::<Reply, _>(&mut self.s)
            .await
            .unwrap()
            .expect("agent closed the connection")
    }

    /// Sends one request and returns its (single) reply, checking the id.
    async fn request(&mut self, body: RequestBody) -> Reply {
        let id = self.send(body).await;
        let r = self.recv().await;
        assert_eq!(r.id(), Some(id), "{r:?}");
        r
    }

    /// Runs an exec and collects its output until `exit`.
    async fn exec(&mut self, exec: Exec) -> Outcome {
        let id = self.send(RequestBody::Exec(exec)).await;
        let mut out = Outcome::default();
        loop {
            match self.recv().await {
                Reply::Stdout { id: i, data } if i == id => out.stdout.extend(data),
                Reply::Stderr { id: i, data } if i == id => out.stderr.extend(data),
                Reply::Exit(e) if e.id == id => {
                    out.exit = Some(e);
                    return out;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

#[derive(Default, Debug)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<Exit>,
}

impl Outcome {
    fn exit(&self) -> &Exit {
        self.exit.as_ref().unwrap()
    }
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn exec(lang: &str, code: &str) -> Exec {
    Exec::new(lang, code)
}

/// Non-zombie processes whose process group is `pgid`.
fn live_members(pgid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command (which may hold spaces): state ppid pgrp ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 2 && f[2] == pgid.to_string() && f[0] != "Z" && f[0] != "X" {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
async fn hello_lists_host_languages() {
    let h = start().await;
    for lang in ["python", "bash", "c", "perl"] {
        assert!(h.languages.contains(&lang.to_string()), "{:?}", h.languages);
    }
    let _ = Client::connect(&h).await;
}

#[tokio::test]
async fn python_prints_42() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let out = c.exec(exec("python", "print(6*7)")).await;
    assert_eq!(out.stdout(), "42\n");
    assert_eq!(out.exit().status, ExecStatus::Success);
    assert_eq!(out.exit().exit_code, Some(0));
    assert!(!out.exit().timed_out);
}

#[tokio::test]
async fn code_runs_unprivileged_with_stdin_env_and_argv() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let mut e = exec(
        "bash",
        "id -u; echo \"$GREETING\"; echo \"$1\"; cat; touch /root/x 2>/dev/null || echo denied",
    );
    e.stdin = b"from stdin\n".to_vec();
    e.env = BTreeMap::from([("GREETING".into(), "hi".into())]);
    e.argv = vec!["arg1".into()];
    let out = c.exec(e).await;
    assert_eq!(out.stdout(), "65534\nhi\narg1\nfrom stdin\ndenied\n");
    assert_eq!(out.exit().status, ExecStatus::Success);
}

#[tokio::test]
async fn non_zero_exit_is_error() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let out = c.exec(exec("python", "import sys; sys.exit(3)")).await;
    assert_eq!(out.exit().status, ExecStatus::Error);
    assert_eq!(out.exit().exit_code, Some(3));
    let out = c.exec(exec("bash", "kill -9 $$")).await;
    assert_eq!(out.exit().status, ExecStatus::Error);
    assert_eq!(out.exit().signal, Some(9));
    assert_eq!(out.exit().exit_code, None);
}

#[tokio::test]
async fn timeout_kills_the_whole_tree_including_detached_grandchild() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let mut e = exec("bash", "echo $$; (exec >&- 2>&-; sleep 100) & sleep 100");
    e.timeout_ms = 500;
    let out = c.exec(e).await;
    let exit = out.exit();
    assert_eq!(exit.status, ExecStatus::Timeout);
    assert_eq!(exit.exit_code, Some(124));
    assert!(exit.timed_out);
    let pgid: i32 = out.stdout().trim().parse().unwrap();
    // SIGKILL has been sent to every member; wait (bounded) until the kernel has torn them
    // down, then assert none is left.
    let mut left = live_members(pgid);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = live_members(pgid);
    }
    assert!(left.is_empty(), "processes left in group {pgid}: {left:?}");
}

#[tokio::test]
async fn background_processes_do_not_outlive_the_exec() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let out = c.exec(exec("bash", "echo $$; sleep 100 &")).await;
    assert_eq!(out.exit().status, ExecStatus::Success);
    let pgid: i32 = out.stdout().trim().parse().unwrap();
    let mut left = live_members(pgid);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        left = live_members(pgid);
    }
    assert!(left.is_empty(), "processes left in group {pgid}: {left:?}");
}

#[tokio::test]
async fn output_cap_truncates_with_marker_and_keeps_draining() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let mut e = exec(
        "python",
        "import sys\nsys.stdout.write('x' * 1000000)\nsys.stdout.flush()\nprint('done', file=sys.stderr)\n",
    );
    e.max_output_bytes = 1000;
    let out = c.exec(e).await;
    let exit = out.exit();
    assert_eq!(exit.status, ExecStatus::Success, "{out:?}");
    assert!(exit.stdout_truncated);
    assert!(!exit.stderr_truncated);
    let expected = format!("{}{}", "x".repeat(1000), TRUNCATION_MARKER);
    assert_eq!(out.stdout(), expected);
    assert_eq!(out.stderr, b"done\n");
}

#[tokio::test]
async fn binary_output_survives() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let out = c
        .exec(exec(
            "python",
            "import sys\nsys.stdout.buffer.write(bytes(range(256)))\n",
        ))
        .await;
    assert_eq!(out.stdout, (0..=255u8).collect::<Vec<_>>());
    assert_eq!(out.exit().status, ExecStatus::Success);
}

#[tokio::test]
async fn c_compile_error_and_success() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let out = c.exec(exec("c", "int main(void) { return nope; }\n")).await;
    let exit = out.exit();
    assert_eq!(exit.status, ExecStatus::CompileError, "{out:?}");
    let text = exit.compile_output.as_deref().unwrap();
    assert!(text.contains("nope"), "{text}");
    assert!(text.contains("error"), "{text}");
    assert!(out.stdout.is_empty());

    let out = c
        .exec(exec(
            "c",
            "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 6*7); return 0; }\n",
        ))
        .await;
    assert_eq!(out.stdout(), "42\n", "{out:?}");
    assert_eq!(out.exit().status, ExecStatus::Success);
}

#[tokio::test]
async fn perl_runs() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let out = c.exec(exec("perl", "print 6*7, qq(\\n);")).await;
    assert_eq!(out.stdout(), "42\n");
}

#[tokio::test]
async fn two_execs_run_concurrently_on_one_connection() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    // Each waits for a file only the other creates, so they must overlap to finish.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let d = dir.path().display();
    let script = |mine: &str, other: &str| {
        format!(
            "touch {d}/{mine}; for i in $(seq 1 200); do [ -e {d}/{other} ] && {{ echo {mine} ok; exit 0; }}; sleep 0.05; done; exit 1"
        )
    };
    let a = c
        .send(RequestBody::Exec(exec("bash", &script("a", "b"))))
        .await;
    let b = c
        .send(RequestBody::Exec(exec("bash", &script("b", "a"))))
        .await;
    let mut stdout: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut exits: BTreeMap<u64, Exit> = BTreeMap::new();
    while exits.len() < 2 {
        match c.recv().await {
            Reply::Stdout { id, data } => stdout.entry(id).or_default().extend(data),
            Reply::Stderr { .. } => {}
            Reply::Exit(e) => {
                exits.insert(e.id, e);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(exits[&a].status, ExecStatus::Success);
    assert_eq!(exits[&b].status, ExecStatus::Success);
    assert_eq!(stdout[&a], b"a ok\n");
    assert_eq!(stdout[&b], b"b ok\n");
}

#[tokio::test]
async fn signal_stops_a_running_exec() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let id = c
        .send(RequestBody::Exec(exec("bash", "echo started; sleep 100")))
        .await;
    match c.recv().await {
        Reply::Stdout { id: i, data } => {
            assert_eq!(i, id);
            assert_eq!(data, b"started\n");
        }
        other => panic!("unexpected {other:?}"),
    }
    let sid = c
        .send(RequestBody::Signal(Signal {
            target: id,
            signal: 15,
        }))
        .await;
    let mut got_ok = false;
    let mut exit = None;
    while exit.is_none() || !got_ok {
        match c.recv().await {
            Reply::Ok { id } if id == sid => got_ok = true,
            Reply::Exit(e) => exit = Some(e),
            other => panic!("unexpected {other:?}"),
        }
    }
    let exit = exit.unwrap();
    assert_eq!(exit.status, ExecStatus::Error);
    assert_eq!(exit.signal, Some(15));
    // Signalling something that is not running is an error.
    let sid = c
        .send(RequestBody::Signal(Signal {
            target: 9999,
            signal: 15,
        }))
        .await;
    assert!(matches!(
        c.recv().await,
        Reply::Error { id: Some(i), code: ErrorCode::NotFound, .. } if i == sid
    ));
}

#[tokio::test]
async fn bad_frames_get_error_replies_and_the_connection_keeps_working() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let raw = |body: &[u8]| {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    };
    c.s.write_all(&raw(b"this is not json")).await.unwrap();
    assert!(matches!(
        c.recv().await,
        Reply::Error {
            id: None,
            code: ErrorCode::BadFrame,
            ..
        }
    ));
    c.s.write_all(&raw(br#"{"id":5,"type":"format_disk"}"#))
        .await
        .unwrap();
    assert!(matches!(
        c.recv().await,
        Reply::Error {
            id: Some(5),
            code: ErrorCode::UnknownType,
            ..
        }
    ));
    c.s.write_all(&raw(br#"{"id":6,"type":"exec","lang":"python"}"#))
        .await
        .unwrap();
    assert!(matches!(
        c.recv().await,
        Reply::Error {
            id: Some(6),
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    // An oversized frame is skipped whole.
    let len = MAX_FRAME + 1;
    let mut big = (len as u32).to_be_bytes().to_vec();
    big.resize(4 + len, b' ');
    c.s.write_all(&big).await.unwrap();
    assert!(matches!(
        c.recv().await,
        Reply::Error {
            code: ErrorCode::FrameTooLarge,
            ..
        }
    ));
    let id = c.send(RequestBody::Exec(exec("cobol-2099", "x"))).await;
    assert!(matches!(
        c.recv().await,
        Reply::Error { id: Some(i), code: ErrorCode::UnknownLanguage, .. } if i == id
    ));
    let out = c.exec(exec("python", "print(6*7)")).await;
    assert_eq!(out.stdout(), "42\n");
}

#[tokio::test]
async fn hello_is_required_and_versions_are_checked() {
    let h = start().await;
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    let req = Request {
        id: 1,
        body: RequestBody::Exec(exec("python", "print(1)")),
    };
    write_message_async(&mut s, &req).await.unwrap();
    let r: Reply = read_message_async(&mut s).await.unwrap().unwrap();
    assert!(matches!(
        r,
        Reply::Error {
            id: Some(1),
            code: ErrorCode::HelloRequired,
            ..
        }
    ));
    let hello = Request {
        id: 2,
        body: RequestBody::Hello(Hello {
            version: PROTOCOL_VERSION + 1,
            client: "future".into(),
            token: None,
        }),
    };
    write_message_async(&mut s, &hello).await.unwrap();
    let r: Reply = read_message_async(&mut s).await.unwrap().unwrap();
    assert!(matches!(
        r,
        Reply::Error {
            id: Some(2),
            code: ErrorCode::VersionMismatch,
            ..
        }
    ));
}

#[tokio::test]
async fn a_dropped_connection_does_not_hurt_the_agent() {
    let h = start().await;
    {
        let mut c = Client::connect(&h).await;
        c.send(RequestBody::Exec(exec("bash", "sleep 100"))).await;
        c.s.write_all(&[0, 0]).await.unwrap(); // half a header, then gone
    }
    let mut c = Client::connect(&h).await;
    let out = c.exec(exec("python", "print(6*7)")).await;
    assert_eq!(out.stdout(), "42\n");
}

#[tokio::test]
async fn put_and_get_files_stay_in_the_workspace() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let id = c
        .send(RequestBody::PutFile(PutFile {
            path: "proj/input.bin".into(),
            data: data.clone(),
            mode: 0o600,
            append: false,
        }))
        .await;
    assert_eq!(c.recv().await, Reply::Ok { id });
    let id = c
        .send(RequestBody::GetFile(GetFile {
            path: "proj/input.bin".into(),
            offset: 0,
            length: None,
        }))
        .await;
    assert_eq!(
        c.recv().await,
        Reply::FileData {
            id,
            data: data.clone(),
            mode: 0o600,
            size: 10_000,
        }
    );
    // An exec in that directory sees the file and can leave results.
    let mut e = exec(
        "python",
        "import os\nprint(len(open('input.bin','rb').read()))\nopen('out.txt','w').write('result')\n",
    );
    e.workdir = Some("proj".into());
    let out = c.exec(e).await;
    assert_eq!(out.stdout(), "10000\n", "{out:?}");
    let id = c
        .send(RequestBody::GetFile(GetFile {
            path: "proj/out.txt".into(),
            offset: 0,
            length: None,
        }))
        .await;
    match c.recv().await {
        Reply::FileData { id: i, data, .. } => {
            assert_eq!(i, id);
            assert_eq!(data, b"result");
        }
        other => panic!("unexpected {other:?}"),
    }
    // The program plants a symlink to escape; the agent refuses to follow it.
    let mut e = exec("bash", "ln -s /etc escape; ln -s /etc/hostname f");
    e.workdir = Some("proj".into());
    assert_eq!(c.exec(e).await.exit().status, ExecStatus::Success);
    for path in [
        "/etc/passwd",
        "../etc/passwd",
        "proj/../../x",
        "proj/escape/hostname",
        "proj/f",
    ] {
        let id = c
            .send(RequestBody::GetFile(GetFile {
                path: path.into(),
                offset: 0,
                length: None,
            }))
            .await;
        match c.recv().await {
            Reply::Error {
                id: Some(i), code, ..
            } => {
                assert_eq!(i, id);
                assert_eq!(code, ErrorCode::PathRefused, "{path}");
            }
            other => panic!("{path}: unexpected {other:?}"),
        }
        let id = c
            .send(RequestBody::PutFile(PutFile {
                path: path.into(),
                data: b"pwned".to_vec(),
                mode: 0o644,
                append: false,
            }))
            .await;
        assert!(
            matches!(c.recv().await, Reply::Error { id: Some(i), code: ErrorCode::PathRefused, .. } if i == id),
            "{path}"
        );
    }
    let id = c
        .send(RequestBody::GetFile(GetFile {
            path: "proj/missing".into(),
            offset: 0,
            length: None,
        }))
        .await;
    assert!(matches!(
        c.recv().await,
        Reply::Error { id: Some(i), code: ErrorCode::NotFound, .. } if i == id
    ));
    assert!(!Path::new("/etc/pwned").exists());
}

#[tokio::test]
async fn fresh_exec_directories_are_removed() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let out = c.exec(exec("bash", "pwd")).await;
    let dir = out.stdout().trim().to_string();
    assert!(dir.contains("/.exec/"), "{dir}");
    assert!(!Path::new(&dir).exists(), "{dir} left behind");
}

#[tokio::test]
async fn shutdown_request_stops_serve() {
    let ws = tempfile::tempdir().unwrap();
    let opts = AgentOptions {
        listen: vec![parse_listen("tcp://127.0.0.1:0").unwrap()],
        workspace: ws.path().to_path_buf(),
        pid1: Pid1Mode::Off,
        ..AgentOptions::default()
    };
    let agent = Agent::bind(opts).await.unwrap();
    let h = Harness {
        addr: agent.tcp_addr().unwrap(),
        languages: Vec::new(),
        ws,
    };
    let serving = tokio::spawn(agent.serve());
    let mut c = Client::connect(&h).await;
    let id = c
        .send(RequestBody::Shutdown(Shutdown { poweroff: false }))
        .await;
    assert_eq!(c.recv().await, Reply::Ok { id });
    assert_eq!(serving.await.unwrap(), infra_guest::ShutdownKind::Reboot);
}

#[tokio::test]
async fn unix_socket_listener_works() {
    let ws = tempfile::tempdir().unwrap();
    let sock = ws.path().join("agent.sock");
    let opts = AgentOptions {
        listen: vec![parse_listen(&format!("unix:{}", sock.display())).unwrap()],
        workspace: ws.path().join("ws"),
        pid1: Pid1Mode::Off,
        ..AgentOptions::default()
    };
    let agent = Agent::bind(opts).await.unwrap();
    tokio::spawn(agent.serve());
    let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let hello = Request {
        id: 1,
        body: RequestBody::Hello(Hello {
            version: PROTOCOL_VERSION,
            client: "t".into(),
            token: None,
        }),
    };
    write_message_async(&mut s, &hello).await.unwrap();
    let r: Reply = read_message_async(&mut s).await.unwrap().unwrap();
    assert!(matches!(r, Reply::HelloReply { id: 1, .. }));
}

#[tokio::test]
async fn missing_vsock_or_serial_alone_is_an_error_not_a_panic() {
    let ws = tempfile::tempdir().unwrap();
    let opts = AgentOptions {
        listen: vec![parse_listen("serial:no-such-port").unwrap()],
        workspace: ws.path().to_path_buf(),
        pid1: Pid1Mode::Off,
        ..AgentOptions::default()
    };
    assert!(matches!(
        Agent::bind(opts).await,
        Err(infra_guest::AgentError::NoListener { .. })
    ));
}

/// A build that prints megabytes of errors: the `exit` must still fit in a frame, so the
/// agent cuts `compile_output` and the connection stays usable.
#[tokio::test]
async fn huge_compile_output_is_cut_and_the_connection_stays_open() {
    let h = start().await;
    if !h.languages.iter().any(|l| l == "c") {
        panic!("gcc is needed on the host for this test");
    }
    let mut c = Client::connect(&h).await;
    // 1000 undeclared names on one 9 KB line: gcc quotes the line with each error (~9 MB).
    let body: String = (0..1000).map(|i| format!("v{i}=1;")).collect();
    let mut e = exec("c", &format!("int main(void) {{ {body} }}\n"));
    e.max_output_bytes = 16 << 20;
    e.timeout_ms = 120_000;
    let out = c.exec(e).await;
    let exit = out.exit();
    assert_eq!(exit.status, ExecStatus::CompileError, "{:?}", exit.status);
    let text = exit.compile_output.as_deref().unwrap();
    assert!(text.len() <= MAX_COMPILE_OUTPUT, "{}", text.len());
    assert!(
        text.ends_with(TRUNCATION_MARKER),
        "{}",
        &text[text.len() - 100..]
    );
    // The same connection still works.
    let out = c.exec(exec("python", "print(6*7)")).await;
    assert_eq!(out.stdout(), "42\n");
}

/// Numbers from the host are range-checked: none overflows or panics the agent.
#[tokio::test]
async fn out_of_range_numbers_are_refused_without_panicking() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let mut e = exec("python", "print(1)");
    e.timeout_ms = u64::MAX;
    let id = c.send(RequestBody::Exec(e)).await;
    match c.recv().await {
        Reply::Error {
            id: Some(i), code, ..
        } if i == id => {
            assert_eq!(code, ErrorCode::BadRequest)
        }
        other => panic!("expected bad_request, got {other:?}"),
    }
    // Extreme limits that are in range still run the program.
    let mut e = exec("python", "print(2)");
    e.timeout_ms = MAX_TIMEOUT_MS;
    e.max_output_bytes = u64::MAX;
    e.memory_mb = Some(u64::MAX);
    e.max_pids = Some(u32::MAX);
    let out = c.exec(e).await;
    assert_eq!(out.stdout(), "2\n", "{out:?}");
    // Signal numbers out of range are refused.
    for sig in [i32::MIN, -1, 0, 65, i32::MAX] {
        let id = c
            .send(RequestBody::Signal(Signal {
                target: 1,
                signal: sig,
            }))
            .await;
        match c.recv().await {
            Reply::Error { id: Some(i), .. } if i == id => {}
            other => panic!("signal {sig}: expected an error, got {other:?}"),
        }
    }
    // The agent is still there.
    let out = c.exec(exec("python", "print(3)")).await;
    assert_eq!(out.stdout(), "3\n");
}

#[tokio::test]
async fn programs_run_with_no_new_privs() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let out = c
        .exec(exec(
            "python",
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0])",
        ))
        .await;
    assert_eq!(out.stdout(), "1\n", "{out:?}");
}

/// The error code of an error reply, else a panic.
fn error_code(r: &Reply) -> ErrorCode {
    match r {
        Reply::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn hello_announces_file_transfer() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    match c
        .request(RequestBody::Hello(Hello {
            version: PROTOCOL_VERSION,
            client: "test".into(),
            token: None,
        }))
        .await
    {
        Reply::HelloReply { features, .. } => {
            assert!(features.contains(&FEATURE_FILE_TRANSFER.to_string()))
        }
        other => panic!("{other:?}"),
    }
}

/// A 5 MiB file, more than one frame holds, goes in as 2 MiB appended chunks and comes back
/// in 2 MiB ranges, byte for byte; each range reports the whole size.
#[tokio::test]
async fn a_5_mib_file_round_trips_in_chunks() {
    const CHUNK: usize = 2 << 20;
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let data: Vec<u8> = (0..5u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        let r = c
            .request(RequestBody::PutFile(PutFile {
                path: "in/big.bin".into(),
                data: chunk.to_vec(),
                mode: 0o640,
                append: i > 0,
            }))
            .await;
        assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
    }
    assert_eq!(
        std::fs::metadata(h.ws.path().join("in/big.bin"))
            .unwrap()
            .len(),
        5 << 20
    );
    let mut back = Vec::new();
    while back.len() < data.len() {
        match c
            .request(RequestBody::GetFile(GetFile {
                path: "in/big.bin".into(),
                offset: back.len() as u64,
                length: Some(CHUNK as u64),
            }))
            .await
        {
            Reply::FileData {
                data: d,
                mode,
                size,
                ..
            } => {
                assert_eq!((mode, size), (0o640, 5 << 20));
                assert_eq!(d.len(), CHUNK.min(data.len() - back.len()));
                back.extend(d);
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(back == data, "the file came back changed");
    // The whole file in one reply does not fit a frame: refused, as before.
    let r = c
        .request(RequestBody::GetFile(GetFile {
            path: "in/big.bin".into(),
            offset: 0,
            length: None,
        }))
        .await;
    assert_eq!(error_code(&r), ErrorCode::TooLarge);
}

/// What a program leaves in `output/` is listed without following its symlink to `/` and
/// without its fifo; only its regular files appear, by relative path.
#[tokio::test]
async fn list_files_skips_symlinks_and_fifos() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let r = c
        .request(RequestBody::MakeDir(MakeDir {
            path: "output".into(),
            mode: 0o755,
        }))
        .await;
    assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
    let mut e = exec(
        "bash",
        "mkdir -p output/sub && printf hello > output/result.txt && printf 12345 > output/sub/b.bin \
         && ln -s / output/root && ln -s /etc/passwd output/passwd && mkfifo output/fifo",
    );
    e.workdir = Some(".".into());
    let out = c.exec(e).await;
    assert_eq!(out.exit().status, ExecStatus::Success, "{out:?}");
    match c
        .request(RequestBody::ListFiles(ListFiles {
            path: "output".into(),
            max_entries: 100,
        }))
        .await
    {
        Reply::FileList {
            entries, truncated, ..
        } => {
            assert!(!truncated);
            let got: Vec<(&str, u64)> = entries.iter().map(|e| (e.path.as_str(), e.size)).collect();
            assert_eq!(got, [("result.txt", 5), ("sub/b.bin", 5)]);
        }
        other => panic!("{other:?}"),
    }
    // The listing itself may not start at a symlink or outside the workspace.
    for (path, code) in [
        ("output/root", ErrorCode::PathRefused),
        ("../", ErrorCode::PathRefused),
        ("/", ErrorCode::PathRefused),
        ("missing", ErrorCode::NotFound),
    ] {
        let r = c
            .request(RequestBody::ListFiles(ListFiles {
                path: path.into(),
                max_entries: 100,
            }))
            .await;
        assert_eq!(error_code(&r), code, "{path}");
    }
}

/// `make_dir` creates parents for the run-as user, and refuses to leave the workspace.
#[tokio::test]
async fn make_dir_refuses_escapes() {
    let h = start().await;
    let mut c = Client::connect(&h).await;
    let outside = tempfile::tempdir().unwrap();
    let name = outside.path().file_name().unwrap().to_str().unwrap();
    for path in [
        "..".to_string(),
        format!("../{name}/x"),
        format!("a/../../{name}/x"),
        format!("{}/x", outside.path().display()),
    ] {
        let r = c
            .request(RequestBody::MakeDir(MakeDir {
                path: path.clone(),
                mode: 0o755,
            }))
            .await;
        assert_eq!(error_code(&r), ErrorCode::PathRefused, "{path}");
    }
    assert!(!outside.path().join("x").exists());
    let r = c
        .request(RequestBody::MakeDir(MakeDir {
            path: "a/b".into(),
            mode: 0o700,
        }))
        .await;
    assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
    let m = std::fs::metadata(h.ws.path().join("a/b")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&m), 65534);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777,
        0o700
    );
}

/// `workdir: "."` runs in the workspace itself: the program sees the files put there, and,
/// with the workspace given to the run-as user, writes next to them.
#[tokio::test]
async fn workdir_dot_runs_in_the_workspace_root() {
    let h = start_with(true).await;
    let mut c = Client::connect(&h).await;
    let r = c
        .request(RequestBody::PutFile(PutFile {
            path: "data.txt".into(),
            data: b"21".to_vec(),
            mode: 0o644,
            append: false,
        }))
        .await;
    assert!(matches!(r, Reply::Ok { .. }), "{r:?}");
    let mut e = exec(
        "python",
        "import os\nprint(os.getcwd())\nopen('doubled.txt','w').write(str(2*int(open('data.txt').read())))\n",
    );
    e.workdir = Some(".".into());
    let out = c.exec(e).await;
    assert_eq!(out.exit().status, ExecStatus::Success, "{out:?}");
    let ws = std::fs::canonicalize(h.ws.path()).unwrap();
    assert_eq!(out.stdout().trim(), ws.to_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(ws.join("doubled.txt")).unwrap(),
        "42"
    );
    // Still only "." means the root: an empty workdir is refused.
    let mut e = exec("bash", "pwd");
    e.workdir = Some(String::new());
    let id = c.send(RequestBody::Exec(e)).await;
    let r = c.recv().await;
    assert_eq!(r.id(), Some(id));
    assert_eq!(error_code(&r), ErrorCode::PathRefused);
}
