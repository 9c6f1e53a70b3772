//! A small QMP (QEMU Machine Protocol) client: JSON commands on the VM's control socket, with
//! file descriptors passed by `SCM_RIGHTS` (`getfd`). Blocking, for use in `spawn_blocking`:
//! the calls are few and short, and passing descriptors needs `sendmsg`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::VmError;

/// Longest QMP line accepted (QEMU's replies here are a few hundred bytes).
const MAX_LINE: u64 = 1 << 20;

/// A connected QMP session, past the capabilities handshake.
pub(crate) struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

fn err(detail: impl Into<String>) -> VmError {
    VmError::Snapshot {
        backend: "qemu",
        detail: detail.into(),
    }
}

impl Qmp {
    /// Connects to `path` (waiting up to `wait` for QEMU to create it) and negotiates.
    pub(crate) fn connect(path: &Path, wait: Duration) -> Result<Self, VmError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < wait => {
                    tracing::trace!(error = %e, "QMP socket not ready");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(VmError::io(format!("connect to QMP {}", path.display()), e)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| VmError::io("QMP socket timeout", e))?;
        let reader = BufReader::new(
            stream
                .try_clone()
                .map_err(|e| VmError::io("QMP socket", e))?,
        );
        let mut q = Qmp { stream, reader };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(err(format!("QMP greeting expected, got {greeting}")));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        let n = Read::by_ref(&mut self.reader)
            .take(MAX_LINE)
            .read_line(&mut line)
            .map_err(|e| VmError::io("read from QMP", e))?;
        if n == 0 {
            return Err(err("QEMU closed its QMP socket"));
        }
        serde_json::from_str(&line).map_err(|e| err(format!("QEMU sent malformed QMP: {e}")))
    }

    /// Runs `command` and returns its `return` value; an `error` reply becomes an error.
    pub(crate) fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, VmError> {
        self.execute_with_fd(command, args, None)
    }

    /// Like [`Qmp::execute`], passing `fd` along with the command (for `getfd`).
    pub(crate) fn execute_with_fd(
        &mut self,
        command: &str,
        args: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, VmError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let bytes = serde_json::to_vec(&msg).expect("JSON of a Value");
        match fd {
            None => self
                .stream
                .write_all(&bytes)
                .map_err(|e| VmError::io(format!("QMP {command}"), e))?,
            Some(fd) => {
                use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
                let fds = [fd.as_raw_fd()];
                let iov = [std::io::IoSlice::new(&bytes)];
                let sent = sendmsg::<UnixAddr>(
                    self.stream.as_raw_fd(),
                    &iov,
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(|e| VmError::io(format!("QMP {command} (sendmsg)"), e.into()))?;
                if sent != bytes.len() {
                    self.stream
                        .write_all(&bytes[sent..])
                        .map_err(|e| VmError::io(format!("QMP {command}"), e))?;
                }
            }
        }
        loop {
            let reply = self.read()?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(e) = reply.get("error") {
                let desc = e.get("desc").and_then(Value::as_str).unwrap_or("no reason");
                return Err(err(format!("QMP {command} failed: {desc}")));
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// Polls `query-migrate` until the migration (either direction) completes; fails with
    /// QEMU's reason when it fails, or after `limit`.
    pub(crate) fn wait_migration(&mut self, limit: Duration) -> Result<Value, VmError> {
        let start = Instant::now();
        loop {
            let st = self.execute("query-migrate", None)?;
            match st.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(st),
                Some("failed") | Some("cancelled") => {
                    let why = st
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("QEMU gave no reason");
                    return Err(err(format!("migration failed: {why}")));
                }
                _ if start.elapsed() > limit => {
                    return Err(err(format!(
                        "migration not done after {} s (status {st})",
                        limit.as_secs()
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}
