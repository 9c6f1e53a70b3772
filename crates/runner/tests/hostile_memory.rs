//! Host memory while a hostile agent streams 100 MiB of stdout (its own test binary, so the
//! process's peak RSS is this test's alone). The stand-in is a thread with a blocking socket,
//! the host side is the real `AgentClient` collecting output the way `Runner::run` does.
//!
//! Measured on the 2-core CI host: see the figure this test prints (`--nocapture`) and
//! `docs/security.md`.

use std::io::Write;
use std::time::Instant;

use infra_protocol::{read_message, write_message, Exec, Reply, Request, PROTOCOL_VERSION};
use infra_runner::{AgentClient, Output, RunError, Violation};

/// `VmHWM` / `VmRSS` of this process, in KiB.
fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

const STREAM: u64 = 100 << 20;
const CHUNK: usize = 64 << 10;

/// Serves one connection: hello, then one exec answered with 100 MiB in frames of `chunk`
/// bytes, for the exec's own id (`own`) or another one, then an exit. Returns the bytes sent
/// before the host hung up.
fn stand_in(l: &std::net::TcpListener, chunk: usize, own: bool) -> u64 {
    let (mut s, _) = l.accept().unwrap();
    let hello: Request = read_message(&mut s).unwrap().unwrap();
    write_message(
        &mut s,
        &Reply::HelloReply {
            id: hello.id,
            version: PROTOCOL_VERSION,
            agent_version: "hostile".into(),
            languages: vec![],
            features: vec![],
        },
    )
    .unwrap();
    let exec: Request = read_message(&mut s).unwrap().unwrap();
    let id = if own { exec.id } else { exec.id + 1 };
    let mut sent = 0u64;
    while sent < STREAM {
        let out = Reply::Stdout {
            id,
            data: vec![b'x'; chunk],
        };
        if write_message(&mut s, &out).is_err() {
            return sent;
        }
        sent += chunk as u64;
    }
    let (status, exit_code) = infra_protocol::ExecStatus::classify(Some(0), false);
    let exit = infra_protocol::Exit {
        id: exec.id,
        status,
        exit_code,
        signal: None,
        timed_out: false,
        wall_ms: 1,
        build_ms: None,
        peak_memory_bytes: None,
        stdout_truncated: false,
        stderr_truncated: false,
        compile_output: None,
    };
    let _ = write_message(&mut s, &Reply::Exit(exit));
    let _ = s.flush();
    sent
}

/// One exec against the stand-in, collecting stdout as `Runner::run` does.
async fn exec(addr: std::net::SocketAddr) -> (Result<infra_protocol::Exit, RunError>, usize) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut client = AgentClient::new(stream);
    client.hello().await.unwrap();
    let exec = Exec::new("python", "print(1)"); // default cap: 1 MiB per stream
    let mut stdout = Vec::new();
    let r = client
        .exec(exec, |o| {
            if let Output::Stdout(d) = o {
                stdout.extend_from_slice(&d);
            }
        })
        .await;
    (r, stdout.len())
}

#[test]
fn a_100_mib_stdout_stream_keeps_host_memory_bounded() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let agent = std::thread::spawn(move || {
        // 1: 100 MiB of the exec's own stdout in 64 KiB events (the host cuts it off).
        let a = stand_in(&l, CHUNK, true);
        // 2: 100 MiB the host must read to the end: 800 frames of 128 KiB for another id
        // (under MAX_STRAY_FRAMES), then the exit.
        let b = stand_in(&l, 128 << 10, false);
        // 3: 100 MiB in frames near the 4 MiB limit (3 MB of data each), for another id.
        let c = stand_in(&l, 3_000_000, false);
        (a, b, c)
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let before = status_kib("VmRSS:");
    let started = Instant::now();
    let (first, kept) = rt.block_on(exec(addr));
    let t1 = started.elapsed();
    let (second, kept2) = rt.block_on(exec(addr));
    let t2 = started.elapsed() - t1;
    let (third, kept3) = rt.block_on(exec(addr));
    let t3 = started.elapsed() - t1 - t2;
    let (sent1, sent2, sent3) = agent.join().unwrap();
    let hwm = status_kib("VmHWM:");
    println!(
        "hostile stream 1 (own stdout): host kept {kept} bytes, stand-in wrote {:.1} MiB before \
         the host hung up, {:.2} s",
        sent1 as f64 / 1048576.0,
        t1.as_secs_f64()
    );
    println!(
        "hostile stream 2 (100 MiB read and dropped): stand-in wrote {:.1} MiB, {:.2} s",
        sent2 as f64 / 1048576.0,
        t2.as_secs_f64()
    );
    println!(
        "hostile stream 3 (near-limit frames, read and dropped): stand-in wrote {:.1} MiB, {:.2} s",
        sent3 as f64 / 1048576.0,
        t3.as_secs_f64()
    );
    println!(
        "process VmRSS before {:.1} MiB, VmHWM after all three {:.1} MiB",
        before as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    match first {
        Err(RunError::Protocol {
            violation:
                Violation::OutputOverflow {
                    stream: "stdout", ..
                },
        }) => {}
        other => panic!("expected an output overflow, got {other:?}"),
    }
    assert!(kept as u64 <= (1 << 20) + infra_runner::OUTPUT_SLACK_BYTES);
    assert_eq!(second.unwrap().exit_code, Some(0));
    assert_eq!((kept2, sent2), (0, STREAM));
    assert_eq!(third.unwrap().exit_code, Some(0));
    assert!(kept3 == 0 && sent3 >= STREAM);
    // The bound: the 1 MiB cap, one 4 MiB frame and its decoded copy, plus the runtime.
    assert!(
        hwm < 32 << 10,
        "peak RSS {hwm} KiB while a hostile agent streamed 100 MiB"
    );
}
