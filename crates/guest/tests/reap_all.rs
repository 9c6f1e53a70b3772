//! The PID-1 reaper (`wait4(-1)`) in its own test binary, since it reaps every child of the
//! process. `Agent::bind` with `Pid1Mode::On` selects it without doing any PID-1 mounts
//! (those happen only in `run_agent`). The test process makes itself a child subreaper, so
//! orphans come back to it as they would to PID 1.

use std::collections::BTreeMap;
use std::time::Duration;

use infra_guest::{parse_listen, Agent, AgentOptions, Pid1Mode};
use infra_protocol::*;
use tokio::net::TcpStream;

async fn exec(s: &mut TcpStream, id: u64, e: Exec) -> (Vec<u8>, Vec<u8>, Exit) {
    write_message_async(
        s,
        &Request {
            id,
            body: RequestBody::Exec(e),
        },
    )
    .await
    .unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match read_message_async::<Reply, _>(s).await.unwrap().unwrap() {
            Reply::Stdout { data, .. } => out.extend(data),
            Reply::Stderr { data, .. } => err.extend(data),
            Reply::Exit(x) => return (out, err, x),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn zombie_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 1 && f[0] == "Z" && f[1] == me {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
async fn reap_all_mode_runs_execs_reports_spawn_failures_and_reaps_orphans() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let ws = tempfile::tempdir().unwrap();
    let agent = Agent::bind(AgentOptions {
        listen: vec![parse_listen("tcp://127.0.0.1:0").unwrap()],
        workspace: ws.path().to_path_buf(),
        pid1: Pid1Mode::On,
        ..AgentOptions::default()
    })
    .await
    .unwrap();
    assert!(agent.is_pid1());
    let addr = agent.tcp_addr().unwrap();
    tokio::spawn(agent.serve());

    let mut s = TcpStream::connect(addr).await.unwrap();
    let hello = Request {
        id: 1,
        body: RequestBody::Hello(Hello {
            version: PROTOCOL_VERSION,
            client: "t".into(),
            token: None,
        }),
    };
    write_message_async(&mut s, &hello).await.unwrap();
    let _: Reply = read_message_async(&mut s).await.unwrap().unwrap();

    let (out, _, x) = exec(&mut s, 2, Exec::new("python", "print(6*7)")).await;
    assert_eq!(out, b"42\n");
    assert_eq!(x.status, ExecStatus::Success);

    // A double fork leaves an orphan that is re-parented to us and must be reaped.
    let (_, _, x) = exec(&mut s, 3, Exec::new("bash", "( sleep 0.2 & ) ; exit 5")).await;
    assert_eq!(x.status, ExecStatus::Error);
    assert_eq!(x.exit_code, Some(5));

    // A program that cannot start: internal_error, with the reason on stderr.
    let mut e = Exec::new("python", "print(1)");
    e.env = BTreeMap::from([("PATH".to_string(), "/nonexistent".to_string())]);
    let (_, err, x) = exec(&mut s, 4, e).await;
    assert_eq!(x.status, ExecStatus::InternalError);
    assert!(
        String::from_utf8_lossy(&err).contains("cannot start python3"),
        "{}",
        String::from_utf8_lossy(&err)
    );

    let (out, _, x) = exec(&mut s, 5, Exec::new("bash", "echo still fine")).await;
    assert_eq!(out, b"still fine\n");
    assert_eq!(x.status, ExecStatus::Success);

    let mut zombies = zombie_children();
    for _ in 0..100 {
        if zombies.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        zombies = zombie_children();
    }
    assert!(zombies.is_empty(), "unreaped children: {zombies:?}");
}
