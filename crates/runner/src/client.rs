//! The host side of the agent protocol over any byte stream (virtio-serial socket, hybrid
//! vsock, TCP, Unix socket).
//!
//! The agent runs next to untrusted code, so nothing it sends is trusted: every frame is read
//! with the strict reader (an oversized one ends the conversation without being read), output
//! is capped per stream, frames that carry no output are counted, and numeric fields are
//! range-checked. Any violation ends the exec with [`RunError::Protocol`]; none panics.
//! Host memory per exec is therefore bounded by the output cap plus one frame
//! ([`infra_protocol::MAX_FRAME`], 4 MiB) and its decoded form. Measured by
//! `tests/hostile_memory.rs` (2026-12-02, debug build): while a stand-in agent sent 100 MiB of
//! stdout, then 100 MiB in 128 KiB frames and 100 MiB in near-4 MiB frames, the peak RSS
//! (VmHWM) of the whole test process, the stand-in's own buffers included, was 23.7 MiB
//! (2.7 MiB before); with 64-128 KiB frames alone it was 4.2 MiB.

use std::collections::HashSet;

use infra_protocol::{
    check_relative_path, read_message_async_strict, write_message_async, Exec, Exit, FileEntry,
    GetFile, Hello, ListFiles, MakeDir, PutFile, Reply, Request, RequestBody, Reseed, Shutdown,
    FEATURE_FILE_TRANSFER, FEATURE_RESEED, MAX_COMPILE_OUTPUT, PROTOCOL_VERSION, TRUNCATION_MARKER,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::error::{RunError, Violation};

/// Frames an exec may receive that carry no output for it (empty chunks, replies for other
/// ids) before the host gives up on the agent. A well-behaved agent sends none: every
/// `stdout`/`stderr` event it sends holds at least one byte, and the `exit` ends the exec. So
/// with the byte caps below, an exec receives at most `2 × (cap + slack) + 1024 + 1` frames.
pub const MAX_STRAY_FRAMES: u64 = 1024;

/// Bytes a stream may carry beyond `max_output_bytes`: the truncation marker plus room for
/// the agent's own one-line notes (e.g. "cannot start python3").
pub const OUTPUT_SLACK_BYTES: u64 = TRUNCATION_MARKER.len() as u64 + 4096;

/// Largest signal number a Linux program can be killed by (`SIGRTMAX`).
const MAX_SIGNAL: i32 = 64;

/// Largest piece of a file sent in one `put_file` or asked for in one `get_file`: 2 MiB,
/// which fits a frame after base64 with room to spare.
pub const FILE_CHUNK_BYTES: u64 = 2 << 20;

/// A directory listing from the agent, checked: every path is a plain relative path
/// ([`infra_protocol::check_relative_path`]), none twice, none both a file and a directory,
/// at most the number asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileListing {
    /// The regular files, in path order.
    pub entries: Vec<FileEntry>,
    /// The agent had more to list than it sent.
    pub truncated: bool,
}

/// What [`AgentClient::get_file_chunked`] copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    /// Bytes written (the file's size).
    pub size: u64,
    /// Permission bits the agent reported.
    pub mode: u32,
}

/// An untrusted value for messages: quoted, control characters escaped, cut at 80 characters.
fn quote(value: &str) -> String {
    let cut: String = value.chars().take(80).collect();
    let more = if cut.len() < value.len() { "..." } else { "" };
    format!("\"{}\"{more}", cut.escape_debug())
}

/// Checks a listing: entry count, each path safe, no duplicates, no path both a file and the
/// parent of another. Sorts it by path.
fn check_listing(
    mut entries: Vec<FileEntry>,
    truncated: bool,
    max_entries: u64,
) -> Result<FileListing, Violation> {
    if entries.len() as u64 > max_entries {
        return Err(Violation::TooManyEntries {
            got: entries.len(),
            max: max_entries,
        });
    }
    for e in &entries {
        check_relative_path(&e.path).map_err(|problem| Violation::UnsafePath {
            path: quote(&e.path),
            problem,
        })?;
    }
    let files: HashSet<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    if files.len() != entries.len() {
        let mut seen = HashSet::new();
        let dup = entries.iter().find(|e| !seen.insert(e.path.as_str()));
        return Err(Violation::PathConflict {
            path: quote(dup.map_or("", |e| e.path.as_str())),
        });
    }
    for e in &entries {
        let mut parent = e.path.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            if files.contains(p) {
                return Err(Violation::PathConflict { path: quote(p) });
            }
            parent = p;
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(FileListing { entries, truncated })
}

/// What the agent said about itself.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Agent build version.
    pub agent_version: String,
    /// Languages whose toolchain is present in the image.
    pub languages: Vec<String>,
    /// Optional protocol features the agent announced (e.g.
    /// [`infra_protocol::FEATURE_FILE_TRANSFER`]).
    pub features: Vec<String>,
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
    /// From `hello`: the agent's version and features.
    agent: Option<(String, Vec<String>)>,
}

/// The short name of a reply type, for errors.
fn reply_kind(r: &Reply) -> &'static str {
    match r {
        Reply::HelloReply { .. } => "hello_reply",
        Reply::Stdout { .. } => "stdout",
        Reply::Stderr { .. } => "stderr",
        Reply::Exit(_) => "exit",
        Reply::FileData { .. } => "file_data",
        Reply::FileList { .. } => "file_list",
        Reply::Ok { .. } => "ok",
        Reply::Error { .. } => "error",
    }
}

fn in_range(field: &'static str, value: Option<i32>, min: i32, max: i32) -> Result<(), Violation> {
    match value {
        Some(v) if !(min..=max).contains(&v) => Err(Violation::OutOfRange {
            field,
            value: i64::from(v),
            min: i64::from(min),
            max: i64::from(max),
        }),
        _ => Ok(()),
    }
}

/// Checks the fields of an `exit` a program's result is built from.
fn check_exit(exit: &Exit) -> Result<(), Violation> {
    // Exit codes come from wait(2) (0..=255; 124 for timeouts); signals from 1..=SIGRTMAX.
    in_range("exit.exit_code", exit.exit_code, 0, 255)?;
    in_range("exit.signal", exit.signal, 1, MAX_SIGNAL)?;
    if let Some(c) = &exit.compile_output {
        if c.len() > MAX_COMPILE_OUTPUT {
            return Err(Violation::CompileOutputTooLarge {
                len: c.len(),
                max: MAX_COMPILE_OUTPUT,
            });
        }
    }
    Ok(())
}

/// Per-exec accounting of what the agent sent.
struct Budget {
    limit: u64,
    stdout: u64,
    stderr: u64,
    stray: u64,
}

impl Budget {
    fn new(max_output_bytes: u64) -> Self {
        Self {
            limit: max_output_bytes.saturating_add(OUTPUT_SLACK_BYTES),
            stdout: 0,
            stderr: 0,
            stray: 0,
        }
    }

    fn output(&mut self, stream: &'static str, len: usize) -> Result<(), Violation> {
        if len == 0 {
            return self.stray();
        }
        let used = if stream == "stdout" {
            &mut self.stdout
        } else {
            &mut self.stderr
        };
        *used = used.saturating_add(len as u64);
        if *used > self.limit {
            return Err(Violation::OutputOverflow {
                stream,
                limit: self.limit,
            });
        }
        Ok(())
    }

    fn stray(&mut self) -> Result<(), Violation> {
        self.stray += 1;
        if self.stray > MAX_STRAY_FRAMES {
            return Err(Violation::TooManyFrames {
                limit: MAX_STRAY_FRAMES,
            });
        }
        Ok(())
    }
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
            agent: None,
        }
    }

    /// Ends the connection from this side (the agent sees the host go away and waits for
    /// the next one). Errors are ignored: the connection is being dropped either way.
    pub async fn close(&mut self) {
        let _ = self.writer.shutdown().await;
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
            .map_err(|source| RunError::AgentSend { source })?;
        Ok(id)
    }

    async fn recv(&mut self) -> Result<Reply, RunError> {
        match read_message_async_strict::<Reply, _>(&mut self.reader).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(RunError::AgentClosed),
            Err(infra_protocol::FrameError::Io(source)) => Err(RunError::AgentRead { source }),
            Err(e) => Err(Violation::Frame(e).into()),
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
                features,
            } if rid == id => {
                if version != PROTOCOL_VERSION {
                    return Err(RunError::VersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                        agent_version,
                    });
                }
                self.agent = Some((agent_version.clone(), features.clone()));
                Ok(AgentInfo {
                    agent_version,
                    languages,
                    features,
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
                    Err(RunError::Refused {
                        code: code.as_str().to_string(),
                        message,
                    })
                }
            }
            other => Err(Violation::Unexpected {
                expected: "hello_reply",
                got: reply_kind(&other),
            }
            .into()),
        }
    }

    /// Runs a program, passing its output to `on_output` as it arrives. At most
    /// `exec.max_output_bytes` plus [`OUTPUT_SLACK_BYTES`] reach `on_output` per stream; an
    /// agent that sends more, or breaks the protocol otherwise, ends the exec with
    /// [`RunError::Protocol`].
    pub async fn exec(
        &mut self,
        exec: Exec,
        mut on_output: impl FnMut(Output),
    ) -> Result<Exit, RunError> {
        let mut budget = Budget::new(exec.max_output_bytes);
        let id = self.send(RequestBody::Exec(exec)).await?;
        loop {
            match self.recv().await? {
                Reply::Stdout { id: r, data } if r == id => {
                    budget.output("stdout", data.len())?;
                    if !data.is_empty() {
                        on_output(Output::Stdout(data));
                    }
                }
                Reply::Stderr { id: r, data } if r == id => {
                    budget.output("stderr", data.len())?;
                    if !data.is_empty() {
                        on_output(Output::Stderr(data));
                    }
                }
                Reply::Exit(exit) if exit.id == id => {
                    check_exit(&exit)?;
                    return Ok(exit);
                }
                Reply::Error { code, message, .. } => {
                    return Err(RunError::Refused {
                        code: code.as_str().to_string(),
                        message,
                    })
                }
                other => {
                    budget.stray()?;
                    tracing::debug!(
                        kind = reply_kind(&other),
                        "ignoring a reply for another request"
                    );
                }
            }
        }
    }

    /// Whether the agent announced `feature` in its `hello_reply`.
    pub fn supports(&self, feature: &str) -> bool {
        self.agent
            .as_ref()
            .is_some_and(|(_, f)| f.iter().any(|x| x == feature))
    }

    fn require(&self, feature: &'static str) -> Result<(), RunError> {
        if self.supports(feature) {
            return Ok(());
        }
        Err(RunError::AgentTooOld {
            agent_version: self
                .agent
                .as_ref()
                .map_or_else(|| "unknown: no hello yet".into(), |(v, _)| v.clone()),
            feature,
        })
    }

    /// Waits for the one reply to request `id`. An `error` becomes [`RunError::Refused`];
    /// replies for other ids are skipped, at most [`MAX_STRAY_FRAMES`] of them.
    async fn reply_to(&mut self, id: u64) -> Result<Reply, RunError> {
        let mut stray = 0u64;
        loop {
            let r = self.recv().await?;
            match r {
                Reply::Error {
                    id: rid,
                    code,
                    message,
                } if rid.is_none_or(|r| r == id) => {
                    return Err(RunError::Refused {
                        code: code.as_str().to_string(),
                        message,
                    })
                }
                r if r.id() == Some(id) => return Ok(r),
                other => {
                    stray += 1;
                    if stray > MAX_STRAY_FRAMES {
                        return Err(Violation::TooManyFrames {
                            limit: MAX_STRAY_FRAMES,
                        }
                        .into());
                    }
                    tracing::debug!(
                        kind = reply_kind(&other),
                        "ignoring a reply for another request"
                    );
                }
            }
        }
    }

    /// Sends a request that is answered with `ok`.
    async fn expect_ok(&mut self, body: RequestBody) -> Result<(), RunError> {
        let id = self.send(body).await?;
        match self.reply_to(id).await? {
            Reply::Ok { .. } => Ok(()),
            other => Err(Violation::Unexpected {
                expected: "ok",
                got: reply_kind(&other),
            }
            .into()),
        }
    }

    /// Makes a VM restored from a snapshot unique: `entropy` into the guest kernel's RNG
    /// (reseeded at once) and its wall clock set to `unix_nanos`.
    pub async fn reseed(&mut self, entropy: Vec<u8>, unix_nanos: u64) -> Result<(), RunError> {
        self.require(FEATURE_RESEED)?;
        self.expect_ok(RequestBody::Reseed(Reseed {
            entropy,
            unix_nanos,
        }))
        .await
    }

    /// Creates the directory `path` in the workspace (with its parents) for the user code runs
    /// as; an existing one is fine.
    pub async fn make_dir(&mut self, path: &str) -> Result<(), RunError> {
        self.require(FEATURE_FILE_TRANSFER)?;
        self.expect_ok(RequestBody::MakeDir(MakeDir {
            path: path.to_string(),
            mode: 0o755,
        }))
        .await
    }

    /// Writes everything `reader` yields to the workspace file `path` (created or truncated,
    /// parents created), in `put_file` chunks of [`FILE_CHUNK_BYTES`], each acknowledged before
    /// the next. Returns the bytes sent.
    pub async fn put_file(
        &mut self,
        path: &str,
        mut reader: impl AsyncRead + Unpin,
        mode: u32,
    ) -> Result<u64, RunError> {
        self.require(FEATURE_FILE_TRANSFER)?;
        let mut sent = 0u64;
        let mut first = true;
        loop {
            let mut chunk = Vec::with_capacity(FILE_CHUNK_BYTES as usize);
            (&mut reader)
                .take(FILE_CHUNK_BYTES)
                .read_to_end(&mut chunk)
                .await
                .map_err(|source| RunError::HostIo {
                    action: "read the data",
                    guest_path: path.to_string(),
                    source,
                })?;
            let len = chunk.len() as u64;
            if len == 0 && !first {
                return Ok(sent);
            }
            self.expect_ok(RequestBody::PutFile(PutFile {
                path: path.to_string(),
                data: chunk,
                mode,
                append: !first,
            }))
            .await?;
            first = false;
            sent += len;
            if len < FILE_CHUNK_BYTES {
                return Ok(sent);
            }
        }
    }

    /// Lists the regular files beneath the workspace directory `path`, at most `max_entries`.
    /// The listing is checked (see [`FileListing`]); a hostile one is a
    /// [`RunError::Protocol`].
    pub async fn list_files(
        &mut self,
        path: &str,
        max_entries: u64,
    ) -> Result<FileListing, RunError> {
        self.require(FEATURE_FILE_TRANSFER)?;
        let id = self
            .send(RequestBody::ListFiles(ListFiles {
                path: path.to_string(),
                max_entries,
            }))
            .await?;
        match self.reply_to(id).await? {
            Reply::FileList {
                entries, truncated, ..
            } => Ok(check_listing(entries, truncated, max_entries)?),
            other => Err(Violation::Unexpected {
                expected: "file_list",
                got: reply_kind(&other),
            }
            .into()),
        }
    }

    /// Copies the workspace file `path` into `writer`, in ranges of [`FILE_CHUNK_BYTES`].
    /// A file over `max_bytes` is refused with [`RunError::FileTooLarge`] before anything is
    /// written. Every range must hold exactly what the file's size leaves for it, and the size
    /// must stay the same from range to range; otherwise [`RunError::Protocol`] (what was
    /// written so far stays in `writer`: the caller discards it).
    pub async fn get_file_chunked(
        &mut self,
        path: &str,
        writer: &mut (impl AsyncWrite + Unpin),
        max_bytes: u64,
    ) -> Result<FileMeta, RunError> {
        self.require(FEATURE_FILE_TRANSFER)?;
        let mut offset = 0u64;
        let mut known: Option<(u64, u32)> = None;
        loop {
            let asked = match known {
                Some((size, _)) if offset >= size => break,
                Some((size, _)) => FILE_CHUNK_BYTES.min(size - offset),
                None => FILE_CHUNK_BYTES,
            };
            let id = self
                .send(RequestBody::GetFile(GetFile {
                    path: path.to_string(),
                    offset,
                    length: Some(asked),
                }))
                .await?;
            let (data, mode, size) = match self.reply_to(id).await? {
                Reply::FileData {
                    data, mode, size, ..
                } => (data, mode, size),
                other => {
                    return Err(Violation::Unexpected {
                        expected: "file_data",
                        got: reply_kind(&other),
                    }
                    .into())
                }
            };
            let got = data.len() as u64;
            if got > asked {
                return Err(Violation::ChunkTooLarge { asked, got }.into());
            }
            match known {
                None if size > max_bytes => {
                    return Err(RunError::FileTooLarge {
                        path: path.to_string(),
                        size,
                        max: max_bytes,
                    })
                }
                None => known = Some((size, mode)),
                Some((was, _)) if was != size => {
                    return Err(Violation::SizeChanged { was, now: size }.into())
                }
                Some(_) => {}
            }
            // `offset` never passes the size: every earlier range held exactly what it left.
            let expected = asked.min(size.saturating_sub(offset));
            if got != expected {
                return Err(Violation::ChunkMismatch { expected, got }.into());
            }
            writer
                .write_all(&data)
                .await
                .map_err(|source| RunError::HostIo {
                    action: "write the data",
                    guest_path: path.to_string(),
                    source,
                })?;
            offset += got;
        }
        writer.flush().await.map_err(|source| RunError::HostIo {
            action: "write the data",
            guest_path: path.to_string(),
            source,
        })?;
        let (size, mode) = known.unwrap_or((0, 0));
        Ok(FileMeta { size, mode })
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
                features: vec![],
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
                build_ms: None,
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
