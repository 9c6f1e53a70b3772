//! The host side of the agent protocol over any byte stream (virtio-serial socket, hybrid
//! vsock, TCP, Unix socket).

use infra_protocol::{
    read_message_async, write_message_async, Exec, Exit, Hello, Reply, Request, RequestBody,
    Shutdown, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};

use crate::error::RunError;

/// What the agent said about itself.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Agent build version.
    pub agent_version: String,
    /// Languages whose toolchain is present in the image.
    pub languages: Vec<String>,
}

/// Output of a running program, as it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Bytes the program wrote to stdout.
    Stdout(Vec<u8>),
    /// Bytes the program wrote to stderr.
    Stderr(Vec<u8>),
}

/// One connection to an agent; requests are sent one at a time.
pub struct AgentClient<S> {
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
    next_id: u64,
    token: Option<String>,
}

impl<S: AsyncRead + AsyncWrite> AgentClient<S> {
    /// Wraps a connected stream.
    pub fn new(stream: S) -> Self {
        let (reader, writer) = tokio::io::split(stream);
        Self {
            reader,
            writer,
            next_id: 1,
            token: None,
        }
    }

    /// Sends `token` in `hello` (an agent on a non-loopback TCP address requires it).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    async fn send(&mut self, body: RequestBody) -> Result<u64, RunError> {
        let id = self.next_id;
        self.next_id += 1;
        write_message_async(&mut self.writer, &Request { id, body })
            .await
            .map_err(|e| RunError::Agent(format!("cannot send to the agent: {e}")))?;
        Ok(id)
    }

    async fn recv(&mut self) -> Result<Reply, RunError> {
        match read_message_async::<Reply, _>(&mut self.reader).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(RunError::Agent("the agent closed the connection".into())),
            Err(e) => Err(RunError::Agent(format!("bad frame from the agent: {e}"))),
        }
    }

    /// Says hello and checks the protocol version (the first request on a connection).
    pub async fn hello(&mut self) -> Result<AgentInfo, RunError> {
        let id = self
            .send(RequestBody::Hello(Hello {
                version: PROTOCOL_VERSION,
                client: format!("infra.operator {}", env!("CARGO_PKG_VERSION")),
                token: self.token.clone(),
            }))
            .await?;
        match self.recv().await? {
            Reply::HelloReply {
                id: rid,
                version,
                agent_version,
                languages,
            } if rid == id => {
                if version != PROTOCOL_VERSION {
                    return Err(RunError::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                        agent_version,
                    });
                }
                Ok(AgentInfo {
                    agent_version,
                    languages,
                })
            }
            Reply::Error { code, message, .. } => {
                if code == infra_protocol::ErrorCode::VersionMismatch {
                    Err(RunError::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: 0,
                        agent_version: message,
                    })
                } else {
                    Err(RunError::Agent(format!("hello refused: {message}")))
                }
            }
            other => Err(RunError::Agent(format!(
                "unexpected hello answer: {other:?}"
            ))),
        }
    }

    /// Runs a program, passing its output to `on_output` as it arrives.
    pub async fn exec(
        &mut self,
        exec: Exec,
        mut on_output: impl FnMut(Output),
    ) -> Result<Exit, RunError> {
        let id = self.send(RequestBody::Exec(exec)).await?;
        loop {
            match self.recv().await? {
                Reply::Stdout { id: r, data } if r == id => on_output(Output::Stdout(data)),
                Reply::Stderr { id: r, data } if r == id => on_output(Output::Stderr(data)),
                Reply::Exit(exit) if exit.id == id => return Ok(exit),
                Reply::Error { code, message, .. } => {
                    return Err(RunError::Refused {
                        code: code.as_str().to_string(),
                        message,
                    })
                }
                other => tracing::debug!(?other, "ignoring a reply for another request"),
            }
        }
    }

    /// Asks the agent to power the VM off (best effort: the VM may go before answering).
    pub async fn shutdown(&mut self) -> Result<(), RunError> {
        self.send(RequestBody::Shutdown(Shutdown { poweroff: true }))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infra_protocol::{read_message_async, write_message_async};

    /// An agent of another protocol generation is named in the error, with what to do.
    #[tokio::test]
    async fn hello_from_another_protocol_version_is_refused() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let fake = tokio::spawn(async move {
            let req: Request = read_message_async(&mut guest).await.unwrap().unwrap();
            let reply = Reply::HelloReply {
                id: req.id,
                version: PROTOCOL_VERSION + 1,
                agent_version: "9.9.9".into(),
                languages: vec!["python".into()],
            };
            write_message_async(&mut guest, &reply).await.unwrap();
        });
        let err = AgentClient::new(host).hello().await.unwrap_err();
        fake.await.unwrap();
        let msg = err.to_string();
        assert!(
            matches!(err, RunError::VersionMismatch { theirs, .. } if theirs == PROTOCOL_VERSION + 1)
        );
        assert!(
            msg.contains("9.9.9") && msg.contains("rebuild the image"),
            "{msg}"
        );
    }

    /// Output events arrive in order and the exit ends the exec; replies for other ids are
    /// skipped.
    #[tokio::test]
    async fn exec_streams_output_then_exit() {
        let (host, mut guest) = tokio::io::duplex(1 << 16);
        let fake = tokio::spawn(async move {
            let req: Request = read_message_async(&mut guest).await.unwrap().unwrap();
            let id = req.id;
            for r in [
                Reply::Stdout {
                    id,
                    data: b"4".to_vec(),
                },
                Reply::Ok { id: id + 100 },
                Reply::Stderr {
                    id,
                    data: b"warn".to_vec(),
                },
                Reply::Stdout {
                    id,
                    data: b"2\n".to_vec(),
                },
            ] {
                write_message_async(&mut guest, &r).await.unwrap();
            }
            let (status, exit_code) = infra_protocol::ExecStatus::classify(Some(0), false);
            let exit = Exit {
                id,
                status,
                exit_code,
                signal: None,
                timed_out: false,
                wall_ms: 5,
                peak_memory_bytes: None,
                stdout_truncated: false,
                stderr_truncated: false,
                compile_output: None,
            };
            write_message_async(&mut guest, &Reply::Exit(exit))
                .await
                .unwrap();
        });
        let mut seen = Vec::new();
        let exit = AgentClient::new(host)
            .exec(Exec::new("python", "print(42)"), |o| seen.push(o))
            .await
            .unwrap();
        fake.await.unwrap();
        assert_eq!(exit.exit_code, Some(0));
        assert_eq!(
            seen,
            [
                Output::Stdout(b"4".to_vec()),
                Output::Stderr(b"warn".to_vec()),
                Output::Stdout(b"2\n".to_vec())
            ]
        );
    }
}
