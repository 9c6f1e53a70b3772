//! The host against a hostile agent: a stand-in task speaks the framing over a real TCP
//! socket to the real `AgentClient`, and misbehaves in every way the host must survive.
//! Each case ends with the documented error (`RunError::Protocol`, `VersionMismatch`,
//! `Refused`) and never panics or hangs. The memory bound under a 100 MiB stream is measured
//! in `hostile_memory.rs` (its own process, so the figure is not shared with these tests).

use std::time::Duration;

use infra_protocol::{
    read_message_async, write_message_async, ErrorCode, Exec, ExecStatus, Exit, Reply, Request,
    RequestBody, MAX_COMPILE_OUTPUT, MAX_FRAME, PROTOCOL_VERSION,
};
use infra_runner::{AgentClient, Output, RunError, Violation, MAX_STRAY_FRAMES};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

type BoxFut = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// What the stand-in does after the exec request (its id is the second argument).
type Script = Box<dyn FnOnce(TcpStream, u64) -> BoxFut + Send>;

fn script<F, Fut>(f: F) -> Script
where
    F: FnOnce(TcpStream, u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    Box::new(move |s, id| Box::pin(f(s, id)))
}

fn exit(id: u64) -> Exit {
    let (status, exit_code) = ExecStatus::classify(Some(0), false);
    Exit {
        id,
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
    }
}

/// Writes one frame with an arbitrary body (no size check: hostile frames may be anything).
async fn raw_frame(s: &mut TcpStream, body: &[u8]) -> std::io::Result<()> {
    s.write_all(&(body.len() as u32).to_be_bytes()).await?;
    s.write_all(body).await
}

/// Starts a stand-in agent on 127.0.0.1 that answers hello properly, then runs `script` on
/// the exec request. Returns the connected client.
async fn stand_in(script: Script) -> AgentClient<TcpStream> {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let hello: Request = read_message_async(&mut s).await.unwrap().unwrap();
        let reply = Reply::HelloReply {
            id: hello.id,
            version: PROTOCOL_VERSION,
            agent_version: "hostile".into(),
            languages: vec!["python".into()],
            features: vec![],
        };
        write_message_async(&mut s, &reply).await.unwrap();
        let Ok(Some(req)) = read_message_async::<Request, _>(&mut s).await else {
            return;
        };
        assert!(matches!(req.body, RequestBody::Exec(_)));
        script(s, req.id).await;
    });
    let mut c = AgentClient::new(TcpStream::connect(addr).await.unwrap());
    c.hello().await.unwrap();
    c
}

/// Runs one exec with the output cap `cap` against `script`; returns the result and the
/// number of output bytes the caller was handed.
async fn exec_against(cap: u64, script: Script) -> (Result<Exit, RunError>, u64) {
    let mut c = stand_in(script).await;
    let mut exec = Exec::new("python", "print(1)");
    exec.max_output_bytes = cap;
    let mut seen = 0u64;
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        c.exec(exec, |o| {
            let (Output::Stdout(d) | Output::Stderr(d)) = o;
            seen += d.len() as u64;
        }),
    )
    .await
    .expect("the host must not hang on a hostile agent");
    (r, seen)
}

fn violation(r: Result<Exit, RunError>) -> Violation {
    match r {
        Err(RunError::Protocol { violation }) => violation,
        other => panic!("expected a protocol violation, got {other:?}"),
    }
}

#[tokio::test]
async fn endless_stdout_ends_at_the_cap_with_output_overflow() {
    let (r, seen) = exec_against(
        64 << 10,
        script(|mut s, id| {
            Box::pin(async move {
                // Endless 1-byte frames: never an exit.
                loop {
                    let out = Reply::Stdout {
                        id,
                        data: vec![b'x'],
                    };
                    if write_message_async(&mut s, &out).await.is_err() {
                        return;
                    }
                }
            })
        }),
    )
    .await;
    let v = violation(r);
    assert!(
        matches!(
            v,
            Violation::OutputOverflow {
                stream: "stdout",
                ..
            }
        ),
        "{v}"
    );
    assert!(
        seen <= (64 << 10) + infra_runner::OUTPUT_SLACK_BYTES,
        "{seen}"
    );
}

#[tokio::test]
async fn endless_frames_without_output_end_with_too_many_frames() {
    for kind in ["empty", "other-id", "ok"] {
        let (r, seen) = exec_against(
            1 << 20,
            script(move |mut s, id| {
                Box::pin(async move {
                    loop {
                        let f = match kind {
                            "empty" => Reply::Stderr { id, data: vec![] },
                            "other-id" => Reply::Stdout {
                                id: id + 1,
                                data: vec![b'x'; 100],
                            },
                            _ => Reply::Ok { id: id + 7 },
                        };
                        if write_message_async(&mut s, &f).await.is_err() {
                            return;
                        }
                    }
                })
            }),
        )
        .await;
        let v = violation(r);
        assert!(
            matches!(v, Violation::TooManyFrames { limit } if limit == MAX_STRAY_FRAMES),
            "{kind}: {v}"
        );
        assert_eq!(seen, 0, "{kind}");
    }
}

/// A stdout frame whose body is exactly `MAX_FRAME` bytes.
fn stdout_frame_of_max_size(id: u64) -> Vec<u8> {
    // {"type":"stdout","id":N,"data":"<base64>"}: find the data length that fills the frame.
    let envelope = serde_json::to_vec(&Reply::Stdout { id, data: vec![] })
        .unwrap()
        .len();
    let b64_room = MAX_FRAME - envelope;
    let data_len = b64_room / 4 * 3;
    let mut body = serde_json::to_vec(&Reply::Stdout {
        id,
        data: vec![b'y'; data_len],
    })
    .unwrap();
    // Pad with JSON whitespace up to the limit (still one valid object).
    while body.len() < MAX_FRAME {
        body.insert(1, b' ');
    }
    assert_eq!(body.len(), MAX_FRAME);
    body
}

#[tokio::test]
async fn frames_at_the_size_limit_are_read_and_capped() {
    // Within a large cap, a frame of exactly MAX_FRAME is accepted and delivered.
    let (r, seen) = exec_against(
        8 << 20,
        script(|mut s, id| {
            Box::pin(async move {
                raw_frame(&mut s, &stdout_frame_of_max_size(id))
                    .await
                    .unwrap();
                write_message_async(&mut s, &Reply::Exit(exit(id)))
                    .await
                    .unwrap();
            })
        }),
    )
    .await;
    assert_eq!(r.unwrap().exit_code, Some(0));
    assert!(seen > 3_000_000, "{seen}");
    // With the default 1 MiB cap the same frame is an overflow.
    let (r, seen) = exec_against(
        1 << 20,
        script(|mut s, id| {
            Box::pin(async move {
                let _ = raw_frame(&mut s, &stdout_frame_of_max_size(id)).await;
            })
        }),
    )
    .await;
    assert!(matches!(violation(r), Violation::OutputOverflow { .. }));
    assert_eq!(seen, 0, "nothing over the cap reaches the caller");
}

#[tokio::test]
async fn an_oversize_frame_ends_the_run_without_reading_its_body() {
    let (r, _) = exec_against(
        1 << 20,
        script(|mut s, _| {
            Box::pin(async move {
                // Announce 4 GiB - 1, send nothing more, keep the connection open.
                s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_secs(120)).await;
            })
        }),
    )
    .await;
    let v = violation(r);
    assert!(
        matches!(
            v,
            Violation::Frame(infra_protocol::FrameError::TooLarge { .. })
        ),
        "{v}"
    );
    // One byte over the limit is refused the same way.
    let (r, _) = exec_against(
        1 << 20,
        script(|mut s, _| {
            Box::pin(async move {
                let _ = s.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes()).await;
                tokio::time::sleep(Duration::from_secs(120)).await;
            })
        }),
    )
    .await;
    assert!(matches!(violation(r), Violation::Frame(_)));
}

#[tokio::test]
async fn garbage_and_cut_frames_are_protocol_errors() {
    for body in [
        &b"not json"[..],
        b"[1]",
        b"{\"type\":\"telemetry\",\"id\":2}",
    ] {
        let body = body.to_vec();
        let (r, _) = exec_against(
            1 << 20,
            script(move |mut s, _| {
                Box::pin(async move {
                    raw_frame(&mut s, &body).await.unwrap();
                })
            }),
        )
        .await;
        assert!(matches!(violation(r), Violation::Frame(_)));
    }
    // A frame cut short, then EOF.
    let (r, _) = exec_against(
        1 << 20,
        script(|mut s, _| {
            Box::pin(async move {
                s.write_all(&100u32.to_be_bytes()).await.unwrap();
                s.write_all(b"{\"type\"").await.unwrap();
            })
        }),
    )
    .await;
    assert!(matches!(
        violation(r),
        Violation::Frame(infra_protocol::FrameError::Truncated { .. })
    ));
    // EOF between frames: the agent closed.
    let (r, _) = exec_against(1 << 20, script(|_s, _| Box::pin(async {}))).await;
    assert!(matches!(r, Err(RunError::AgentClosed)), "{r:?}");
}

#[tokio::test]
async fn out_of_range_numbers_and_huge_compile_output_are_refused() {
    let cases: Vec<(&str, Exit)> = vec![
        (
            "signal",
            Exit {
                signal: Some(i32::MAX),
                exit_code: None,
                ..exit(0)
            },
        ),
        (
            "exit_code",
            Exit {
                exit_code: Some(-5),
                ..exit(0)
            },
        ),
        (
            "compile_output",
            Exit {
                status: ExecStatus::CompileError,
                exit_code: Some(1),
                compile_output: Some("e".repeat(MAX_COMPILE_OUTPUT + 1)),
                ..exit(0)
            },
        ),
    ];
    for (what, e) in cases {
        let (r, _) = exec_against(
            1 << 20,
            script(move |mut s, id| {
                Box::pin(async move {
                    write_message_async(&mut s, &Reply::Exit(Exit { id, ..e }))
                        .await
                        .unwrap();
                })
            }),
        )
        .await;
        let v = violation(r);
        match what {
            "compile_output" => {
                assert!(matches!(v, Violation::CompileOutputTooLarge { .. }), "{v}")
            }
            field => assert!(
                matches!(v, Violation::OutOfRange { field: f, .. } if f.ends_with(field)),
                "{v}"
            ),
        }
        // The exit code a front end derives never overflows, even from such fields.
        let e = Exit {
            signal: Some(i32::MAX),
            exit_code: None,
            ..exit(0)
        };
        assert_eq!(e.shell_exit_code(), i32::MAX);
    }
}

/// Starts a stand-in that answers hello with `reply(id)`, and says hello to it.
async fn hello_against(reply: impl FnOnce(u64) -> Vec<u8> + Send + 'static) -> RunError {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let hello: Request = read_message_async(&mut s).await.unwrap().unwrap();
        raw_frame(&mut s, &reply(hello.id)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let mut c = AgentClient::new(TcpStream::connect(addr).await.unwrap());
    tokio::time::timeout(Duration::from_secs(30), c.hello())
        .await
        .unwrap()
        .unwrap_err()
}

#[tokio::test]
async fn wrong_versions_and_wrong_hello_answers_are_refused() {
    for theirs in [0u32, PROTOCOL_VERSION + 1, u32::MAX] {
        let e = hello_against(move |id| {
            serde_json::to_vec(&Reply::HelloReply {
                id,
                version: theirs,
                agent_version: "x".into(),
                languages: vec![],
                features: vec![],
            })
            .unwrap()
        })
        .await;
        assert!(
            matches!(e, RunError::VersionMismatch { theirs: t, .. } if t == theirs),
            "{e}"
        );
    }
    let e = hello_against(|id| {
        serde_json::to_vec(&Reply::error(
            Some(id),
            ErrorCode::VersionMismatch,
            "agent speaks 7",
        ))
        .unwrap()
    })
    .await;
    assert!(matches!(e, RunError::VersionMismatch { .. }), "{e}");
    let e = hello_against(|id| serde_json::to_vec(&Reply::Ok { id }).unwrap()).await;
    assert!(
        matches!(
            e,
            RunError::Protocol {
                violation: Violation::Unexpected { got: "ok", .. }
            }
        ),
        "{e}"
    );
    // The message is one line that says what happened and what to do.
    let msg = e.to_string();
    assert!(
        !msg.contains('\n') && msg.contains("rebuild the image"),
        "{msg}"
    );
    // A version field that is not a u32 is a bad frame, not a panic.
    let e = hello_against(|id| {
        format!(
            r#"{{"type":"hello_reply","id":{id},"version":-1,"agent_version":"x","languages":[]}}"#
        )
        .into_bytes()
    })
    .await;
    assert!(matches!(e, RunError::Protocol { .. }), "{e}");
}
