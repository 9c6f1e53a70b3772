//! Message types: [`Request`] (host → agent) and [`Reply`] (agent → host).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::TIMEOUT_EXIT_CODE;

/// Feature named in `hello_reply.features` by agents that handle chunked files
/// (`put_file.append`, `get_file.offset`/`length` with `file_data.size`), `list_files`,
/// `make_dir`, and `exec.workdir = "."` (the workspace itself). A host must not send those to
/// an agent without it: an older agent would truncate instead of append, and answer
/// `unknown_type` or `path_refused` to the rest.
pub const FEATURE_FILE_TRANSFER: &str = "file_transfer";

/// Feature named in `hello_reply.features` by agents that accept [`Reseed`]: only an agent
/// that is its machine's init (PID 1) does, since it sets the machine's clock.
pub const FEATURE_RESEED: &str = "reseed";

/// Bytes of entropy a [`Reseed`] carries at most.
pub const MAX_RESEED_BYTES: usize = 512;

/// Directories deeper than this below the listed one are not entered by [`ListFiles`].
pub const MAX_LIST_DEPTH: usize = 16;

/// Default wall-clock limit for an [`Exec`] when the request leaves it out, in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 30_000;

/// Default cap on each of stdout and stderr for an [`Exec`], in bytes.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 20;

/// A request from the host. `id` is chosen by the host and must be unique among the requests
/// still in flight on the connection; every reply to it carries the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Request id, echoed in every reply or event for this request.
    pub id: u64,
    /// What is asked.
    #[serde(flatten)]
    pub body: RequestBody,
}

/// The operation of a [`Request`], tagged by `type` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RequestBody {
    /// Handshake; must be the first request on a connection.
    Hello(Hello),
    /// Build (if needed) and run a program.
    Exec(Exec),
    /// Write a file under the agent's workspace.
    PutFile(PutFile),
    /// Read a file (or a part of it) under the agent's workspace.
    GetFile(GetFile),
    /// List the regular files beneath a directory of the workspace.
    ListFiles(ListFiles),
    /// Create a directory (and its parents) under the workspace.
    MakeDir(MakeDir),
    /// Send a signal to a running exec's process group.
    Signal(Signal),
    /// Stop the agent (and, in PID-1 mode, the machine).
    Shutdown(Shutdown),
    /// After a snapshot restore: mix fresh entropy into the kernel's RNG, reseed it, and set
    /// the wall clock (agents with [`FEATURE_RESEED`]).
    Reseed(Reseed),
}

/// Handshake request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol generation the host speaks ([`crate::PROTOCOL_VERSION`]).
    pub version: u32,
    /// Free-form client name and version, for logs.
    #[serde(default)]
    pub client: String,
    /// The shared secret of an agent listening on a non-loopback TCP address
    /// (`guest --token-file`); compared in constant time. Optional: left out on the wire when
    /// `None`, and ignored by agents that do not ask for one (older agents ignore the field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Run a program: write `code` to the language's source file, build it if the language has a
/// build step, then run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// Language key or alias from the language table.
    pub lang: String,
    /// Source code, written to the language's file name.
    pub code: String,
    /// Extra arguments appended to the language's run command.
    #[serde(default)]
    pub argv: Vec<String>,
    /// Bytes given on the program's standard input (then closed).
    #[serde(default, with = "crate::b64")]
    pub stdin: Vec<u8>,
    /// Environment added over the image and language environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit for build plus run, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Cap on each of stdout and stderr, in bytes; more is drained and dropped.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: u64,
    /// Memory limit in MiB (cgroup `memory.max`, else `RLIMIT_AS`); `None` for no limit.
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Process/thread limit (cgroup `pids.max`, else `RLIMIT_NPROC`); `None` for no limit.
    #[serde(default)]
    pub max_pids: Option<u32>,
    /// Directory relative to the workspace to build and run in, kept afterwards; `"."` is the
    /// workspace itself (agents with [`FEATURE_FILE_TRANSFER`]). `None` means a fresh
    /// directory that is removed when the exec ends.
    #[serde(default)]
    pub workdir: Option<String>,
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}

fn default_max_output_bytes() -> u64 {
    DEFAULT_MAX_OUTPUT_BYTES
}

impl Exec {
    /// An exec of `code` in `lang` with every other field at its default.
    pub fn new(lang: impl Into<String>, code: impl Into<String>) -> Self {
        Self {
            lang: lang.into(),
            code: code.into(),
            argv: Vec::new(),
            stdin: Vec::new(),
            env: BTreeMap::new(),
            timeout_ms: DEFAULT_TIMEOUT_MS,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            memory_mb: None,
            max_pids: None,
            workdir: None,
        }
    }
}

/// Write a file under the workspace (parent directories are created).
///
/// A file larger than one frame is sent in chunks: the first with `append: false` (create or
/// truncate), the rest with `append: true`. Only agents that announce
/// [`FEATURE_FILE_TRANSFER`] honour `append`; an older one would truncate instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutFile {
    /// Path relative to the workspace; absolute paths, `..` and symlinks are refused.
    pub path: String,
    /// File contents (this chunk).
    #[serde(with = "crate::b64")]
    pub data: Vec<u8>,
    /// Permission bits, e.g. `0o644` (420).
    #[serde(default = "default_mode")]
    pub mode: u32,
    /// Append `data` to the file instead of creating or truncating it.
    #[serde(default)]
    pub append: bool,
}

fn default_mode() -> u32 {
    0o644
}

fn default_dir_mode() -> u32 {
    0o755
}

/// Read a file under the workspace, whole or a byte range of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetFile {
    /// Path relative to the workspace; absolute paths, `..` and symlinks are refused.
    pub path: String,
    /// First byte to return.
    #[serde(default)]
    pub offset: u64,
    /// Most bytes to return (the agent returns fewer only at the end of the file). `None`: up
    /// to the end, refused with `too_large` when that does not fit in one frame.
    #[serde(default)]
    pub length: Option<u64>,
}

/// List the regular files beneath a directory, recursively. Symlinks are never followed
/// (nor listed), nor are devices, fifos or sockets; directories deeper than
/// [`MAX_LIST_DEPTH`] below `path` are not entered; names that fail
/// [`check_relative_path`](crate::check_relative_path) are left out. Reply: [`Reply::FileList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListFiles {
    /// Directory relative to the workspace (`.` for the workspace itself).
    pub path: String,
    /// Most entries to return; when there are more, the reply says `truncated`.
    pub max_entries: u64,
}

/// Create a directory under the workspace, with its missing parents, for the user code runs
/// as (`mkdir -p`). An existing directory is fine. Reply: [`Reply::Ok`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MakeDir {
    /// Path relative to the workspace; absolute paths, `..` and symlinks are refused.
    pub path: String,
    /// Permission bits of the directories created.
    #[serde(default = "default_dir_mode")]
    pub mode: u32,
}

/// One regular file in a [`Reply::FileList`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the listed directory, `/`-separated; passes [`check_relative_path`](crate::check_relative_path).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
}

/// Send a signal to the process group of a running exec on the same connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signal {
    /// Id of the [`Exec`] request to signal.
    pub target: u64,
    /// Signal number (e.g. 15 for SIGTERM, 9 for SIGKILL).
    pub signal: i32,
}

/// Stop the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shutdown {
    /// In PID-1 mode: power the machine off (`true`) or reboot it (`false`; with Firecracker
    /// or QEMU `-no-reboot` this also ends the VM). As a plain service the agent only stops.
    #[serde(default = "default_true")]
    pub poweroff: bool,
}

/// Make a restored machine unique: `entropy` goes into the kernel's input pool
/// (`RNDADDENTROPY`, credited), the CRNG is reseeded at once (`RNDRESEEDCRNG`), and
/// `CLOCK_REALTIME` is set to `unix_nanos`. Answered with `ok` once all three are done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reseed {
    /// Random bytes from the host (1 to [`MAX_RESEED_BYTES`]).
    #[serde(with = "crate::b64")]
    pub entropy: Vec<u8>,
    /// The host's wall clock, nanoseconds since the Unix epoch.
    pub unix_nanos: u64,
}

fn default_true() -> bool {
    true
}

/// A reply or event from the agent, tagged by `type` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to [`Hello`].
    HelloReply {
        /// Request id.
        id: u64,
        /// The protocol generation the agent speaks.
        version: u32,
        /// The agent's build version.
        agent_version: String,
        /// Language keys whose commands are found on this machine's `PATH`.
        languages: Vec<String>,
        /// Optional abilities beyond the base protocol ([`FEATURE_FILE_TRANSFER`]); empty
        /// from agents that predate the field.
        #[serde(default)]
        features: Vec<String>,
    },
    /// A chunk of an exec's standard output, as it arrived.
    Stdout {
        /// Exec request id.
        id: u64,
        /// Raw bytes.
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    /// A chunk of an exec's standard error, as it arrived.
    Stderr {
        /// Exec request id.
        id: u64,
        /// Raw bytes.
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
    },
    /// The end of an exec; always the last event for that id.
    Exit(Exit),
    /// Answer to [`GetFile`].
    FileData {
        /// Request id.
        id: u64,
        /// File contents (the requested range).
        #[serde(with = "crate::b64")]
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
        /// The file's whole size in bytes (0 from agents without [`FEATURE_FILE_TRANSFER`]).
        #[serde(default)]
        size: u64,
    },
    /// Answer to [`ListFiles`].
    FileList {
        /// Request id.
        id: u64,
        /// The regular files found, at most `max_entries`, in path order.
        entries: Vec<FileEntry>,
        /// More files were there than listed (`max_entries` reached, or the listing would not
        /// fit in a frame).
        truncated: bool,
    },
    /// Success with nothing to return ([`PutFile`], [`MakeDir`], [`Signal`], [`Shutdown`]).
    Ok {
        /// Request id.
        id: u64,
    },
    /// The request failed (or, with `id: null`, a frame could not be attributed to a request).
    Error {
        /// Request id, when it could be read.
        id: Option<u64>,
        /// Machine-readable cause.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

impl Reply {
    /// The request id this reply belongs to (`None` only for an unattributed [`Reply::Error`]).
    pub fn id(&self) -> Option<u64> {
        match self {
            Reply::HelloReply { id, .. }
            | Reply::Stdout { id, .. }
            | Reply::Stderr { id, .. }
            | Reply::FileData { id, .. }
            | Reply::FileList { id, .. }
            | Reply::Ok { id } => Some(*id),
            Reply::Exit(e) => Some(e.id),
            Reply::Error { id, .. } => *id,
        }
    }

    /// Whether this is the last message for its request id.
    pub fn is_final(&self) -> bool {
        !matches!(self, Reply::Stdout { .. } | Reply::Stderr { .. })
    }

    /// An error reply.
    pub fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        Reply::Error {
            id,
            code,
            message: message.into(),
        }
    }
}

/// The final event of an exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// Exec request id.
    pub id: u64,
    /// Outcome class; see [`ExecStatus::classify`].
    pub status: ExecStatus,
    /// Exit code (124 on timeout; the compiler's code on `compile_error`); `None` when killed
    /// by a signal or never started.
    pub exit_code: Option<i32>,
    /// Signal that ended the program, if any.
    pub signal: Option<i32>,
    /// The wall-clock limit was reached and the process tree was killed.
    pub timed_out: bool,
    /// Wall time of the program's run, in milliseconds; 0 when it never started (a failed
    /// build). Agents before `build_ms` existed counted the build in here too.
    pub wall_ms: u64,
    /// Wall time of the build step (compiled languages), in milliseconds; `None` when the
    /// language has no build step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_ms: Option<u64>,
    /// Peak memory of the run (cgroup `memory.peak`, else the child's max RSS), if known.
    pub peak_memory_bytes: Option<u64>,
    /// Stdout was cut at `max_output_bytes`.
    pub stdout_truncated: bool,
    /// Stderr was cut at `max_output_bytes`.
    pub stderr_truncated: bool,
    /// Compiler output (stdout and stderr) when the build failed.
    pub compile_output: Option<String>,
}

impl Exit {
    /// The code a command-line front end should exit with: the program's code, 124 on timeout,
    /// `128 + signal` when killed by a signal, 1 otherwise. Never overflows, whatever the
    /// fields hold (they come from the other side).
    pub fn shell_exit_code(&self) -> i32 {
        match (self.status, self.exit_code, self.signal) {
            (ExecStatus::Timeout, _, _) => TIMEOUT_EXIT_CODE,
            (_, Some(code), _) => code,
            (_, None, Some(sig)) => sig.saturating_add(128),
            _ => 1,
        }
    }
}

/// Outcome class of an exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecStatus {
    /// The program exited with code 0.
    Success,
    /// The program exited non-zero or was killed by a signal.
    Error,
    /// The wall-clock limit was reached (exit code 124).
    Timeout,
    /// The build step failed.
    CompileError,
    /// The agent could not run the program.
    InternalError,
}

impl ExecStatus {
    /// The wire name (`success`, `error`, `timeout`, `compile_error`, `internal_error`).
    pub fn as_str(self) -> &'static str {
        match self {
            ExecStatus::Success => "success",
            ExecStatus::Error => "error",
            ExecStatus::Timeout => "timeout",
            ExecStatus::CompileError => "compile_error",
            ExecStatus::InternalError => "internal_error",
        }
    }

    /// The status rule: `timeout` (with exit code 124) when the limit was hit, `success` only
    /// for exit code 0, `error` for anything else. Returns the status and the exit code to
    /// report.
    pub fn classify(exit_code: Option<i32>, timed_out: bool) -> (ExecStatus, Option<i32>) {
        if timed_out {
            (ExecStatus::Timeout, Some(TIMEOUT_EXIT_CODE))
        } else if exit_code == Some(0) {
            (ExecStatus::Success, Some(0))
        } else {
            (ExecStatus::Error, exit_code)
        }
    }
}

/// Machine-readable error causes carried by [`Reply::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame body is not JSON, or not a JSON object.
    BadFrame,
    /// The frame is longer than [`crate::MAX_FRAME`]; its body was skipped.
    FrameTooLarge,
    /// The `type` field names no known request.
    UnknownType,
    /// The request's fields are missing or of the wrong type.
    BadRequest,
    /// The host's protocol version is not the agent's.
    VersionMismatch,
    /// A request other than `hello` came before a successful `hello`.
    HelloRequired,
    /// The `hello` lacked the token this listener requires, or carried a wrong one; the agent
    /// closes the connection after this reply.
    Unauthorized,
    /// The id is already in use by a request still in flight.
    DuplicateId,
    /// The exec's language is not in the table.
    UnknownLanguage,
    /// The file, directory or exec id does not exist.
    NotFound,
    /// A path is absolute, contains `..`, or goes through a symlink.
    PathRefused,
    /// The file is too large to send in one frame.
    TooLarge,
    /// A file-system or system-call failure in the agent.
    Io,
    /// Any other failure inside the agent.
    Internal,
    /// A code this build does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The wire name of this code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::DuplicateId => "duplicate_id",
            ErrorCode::UnknownLanguage => "unknown_language",
            ErrorCode::NotFound => "not_found",
            ErrorCode::PathRefused => "path_refused",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Io => "io",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A type that travels as one frame: it knows its `type` tags, so decoding can tell an
/// unknown message type from a malformed known one.
pub trait Message: Serialize + DeserializeOwned {
    /// Every `type` value this message family uses.
    const TYPES: &'static [&'static str];

    /// Decodes a frame body.
    fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let value: serde_json::Value = serde_json::from_slice(body).map_err(DecodeError::Json)?;
        let obj = value.as_object().ok_or(DecodeError::NotObject)?;
        let id = obj.get("id").and_then(serde_json::Value::as_u64);
        match obj.get("type").and_then(serde_json::Value::as_str) {
            None => return Err(DecodeError::MissingType { id }),
            Some(t) if !Self::TYPES.contains(&t) => {
                return Err(DecodeError::UnknownType {
                    id,
                    ty: t.to_string(),
                })
            }
            Some(_) => {}
        }
        serde_json::from_value(value).map_err(|source| DecodeError::Invalid { id, source })
    }

    /// Encodes a frame body.
    fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }
}

impl Message for Request {
    const TYPES: &'static [&'static str] = &[
        "hello",
        "exec",
        "put_file",
        "get_file",
        "list_files",
        "make_dir",
        "signal",
        "shutdown",
        "reseed",
    ];
}

impl Message for Reply {
    const TYPES: &'static [&'static str] = &[
        "hello_reply",
        "stdout",
        "stderr",
        "exit",
        "file_data",
        "file_list",
        "ok",
        "error",
    ];
}

/// Why a frame body is not a valid message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON.
    #[error("frame is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// JSON, but not an object.
    #[error("frame is not a JSON object")]
    NotObject,
    /// No string `type` field.
    #[error("message has no \"type\" field")]
    MissingType {
        /// The message's id, when readable.
        id: Option<u64>,
    },
    /// A `type` this build does not know.
    #[error("unknown message type \"{ty}\"")]
    UnknownType {
        /// The message's id, when readable.
        id: Option<u64>,
        /// The type given.
        ty: String,
    },
    /// A known type with missing or ill-typed fields.
    #[error("invalid message: {source}")]
    Invalid {
        /// The message's id, when readable.
        id: Option<u64>,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

impl DecodeError {
    /// The id of the offending message, when it could be read.
    pub fn id(&self) -> Option<u64> {
        match self {
            DecodeError::Json(_) | DecodeError::NotObject => None,
            DecodeError::MissingType { id }
            | DecodeError::UnknownType { id, .. }
            | DecodeError::Invalid { id, .. } => *id,
        }
    }

    /// The error code to reply with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::Json(_) | DecodeError::NotObject => ErrorCode::BadFrame,
            DecodeError::MissingType { .. } | DecodeError::Invalid { .. } => ErrorCode::BadRequest,
            DecodeError::UnknownType { .. } => ErrorCode::UnknownType,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Messages as peers from before the file-transfer fields send them still decode, with
    /// the new fields at their defaults.
    #[test]
    fn messages_without_the_file_transfer_fields_decode_with_defaults() {
        let put = br#"{"id":3,"type":"put_file","path":"a","data":"AAE=","mode":420}"#;
        match Request::decode(put).unwrap().body {
            RequestBody::PutFile(p) => assert!(!p.append),
            other => panic!("{other:?}"),
        }
        let get = br#"{"id":4,"type":"get_file","path":"a"}"#;
        match Request::decode(get).unwrap().body {
            RequestBody::GetFile(g) => assert_eq!((g.offset, g.length), (0, None)),
            other => panic!("{other:?}"),
        }
        let data = br#"{"id":4,"type":"file_data","data":"AAE=","mode":420}"#;
        assert!(matches!(
            Reply::decode(data).unwrap(),
            Reply::FileData { size: 0, .. }
        ));
        let hello =
            br#"{"id":1,"type":"hello_reply","version":1,"agent_version":"0.1.0","languages":[]}"#;
        match Reply::decode(hello).unwrap() {
            Reply::HelloReply { features, .. } => assert!(features.is_empty()),
            other => panic!("{other:?}"),
        }
        let mkdir = br#"{"id":5,"type":"make_dir","path":"output"}"#;
        match Request::decode(mkdir).unwrap().body {
            RequestBody::MakeDir(m) => assert_eq!(m.mode, 0o755),
            other => panic!("{other:?}"),
        }
    }
}
