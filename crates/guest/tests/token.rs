//! The agent's network face: a TCP listener that is not loopback requires a token, which the
//! host sends in `hello`; loopback needs none.

use infra_guest::{parse_listen, Agent, AgentError, AgentOptions, Pid1Mode};
use infra_protocol::*;
use tokio::net::TcpStream;

const TOKEN: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn opts(listen: &str, ws: &std::path::Path, token: Option<&str>) -> AgentOptions {
    AgentOptions {
        listen: vec![parse_listen(listen).unwrap()],
        workspace: ws.to_path_buf(),
        pid1: Pid1Mode::Off,
        token: token.map(str::to_string),
        ..AgentOptions::default()
    }
}

/// Sends `hello` (with `token`) on a fresh connection to `port` on 127.0.0.1 and returns the
/// reply and whether the agent then closed the connection.
async fn hello(port: u16, token: Option<&str>) -> (Reply, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = Request {
        id: 1,
        body: RequestBody::Hello(Hello {
            version: PROTOCOL_VERSION,
            client: "token-test".into(),
            token: token.map(str::to_string),
        }),
    };
    write_message_async(&mut s, &req).await.unwrap();
    let reply = read_message_async::<Reply, _>(&mut s)
        .await
        .unwrap()
        .expect("a reply");
    // A second request tells whether the connection is still served.
    let next = Request {
        id: 2,
        body: RequestBody::GetFile(GetFile {
            path: "missing".into(),
            offset: 0,
            length: None,
        }),
    };
    let _ = write_message_async(&mut s, &next).await;
    let closed = !matches!(read_message_async::<Reply, _>(&mut s).await, Ok(Some(_)));
    (reply, closed)
}

#[tokio::test]
async fn public_tcp_without_token_refuses_to_start() {
    let ws = tempfile::tempdir().unwrap();
    for listen in ["tcp://0.0.0.0:0", "tcp://[::]:0"] {
        match Agent::bind(opts(listen, ws.path(), None)).await {
            Err(e @ AgentError::TokenRequired { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("--token-file") && msg.contains(listen),
                    "{msg}"
                );
            }
            // No IPv6 on this host: nothing to check for [::].
            Err(AgentError::Bind { .. }) if listen.contains("::") => {}
            Err(e) => panic!("{listen}: unexpected error {e}"),
            Ok(_) => panic!("{listen}: the agent started without a token"),
        }
    }
    assert!(matches!(
        Agent::bind(opts("tcp://0.0.0.0:0", ws.path(), Some("  \n"))).await,
        Err(AgentError::EmptyToken)
    ));
}

#[tokio::test]
async fn public_tcp_hello_needs_the_right_token() {
    let ws = tempfile::tempdir().unwrap();
    let agent = Agent::bind(opts("tcp://0.0.0.0:0", ws.path(), Some(TOKEN)))
        .await
        .unwrap();
    let port = agent.tcp_addr().unwrap().port();
    tokio::spawn(agent.serve());

    for wrong in [
        None,
        Some(""),
        Some("0f1e2d3c4b5a69788796a5b4c3d2e1f"),
        Some("0f1e2d3c4b5a69788796a5b4c3d2e1f00"),
        Some("1f1e2d3c4b5a69788796a5b4c3d2e1f0"),
    ] {
        let (reply, closed) = hello(port, wrong).await;
        match reply {
            Reply::Error { code, message, .. } => {
                assert_eq!(code, ErrorCode::Unauthorized, "{wrong:?}: {message}");
                assert!(message.contains("token"), "{message}");
            }
            other => panic!("{wrong:?}: expected unauthorized, got {other:?}"),
        }
        assert!(closed, "{wrong:?}: the connection stayed open");
    }
    let (reply, closed) = hello(port, Some(TOKEN)).await;
    assert!(matches!(reply, Reply::HelloReply { .. }), "{reply:?}");
    assert!(!closed, "the connection was closed after a good hello");
}

#[tokio::test]
async fn loopback_needs_no_token() {
    let ws = tempfile::tempdir().unwrap();
    let agent = Agent::bind(opts("tcp://127.0.0.1:0", ws.path(), None))
        .await
        .unwrap();
    let port = agent.tcp_addr().unwrap().port();
    tokio::spawn(agent.serve());
    let (reply, closed) = hello(port, None).await;
    assert!(matches!(reply, Reply::HelloReply { .. }), "{reply:?}");
    assert!(!closed);
    // A token set for the public face is not asked for on loopback either.
    let ws2 = tempfile::tempdir().unwrap();
    let agent = Agent::bind(opts("tcp://localhost:0", ws2.path(), Some(TOKEN)))
        .await
        .unwrap();
    let port = agent.tcp_addr().unwrap().port();
    tokio::spawn(agent.serve());
    let (reply, _) = hello(port, None).await;
    assert!(matches!(reply, Reply::HelloReply { .. }), "{reply:?}");
}
