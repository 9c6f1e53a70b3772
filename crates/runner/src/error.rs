//! Run failures, each saying what to do.

use infra_protocol::FrameError;

/// Why a run could not produce a program result.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The VM could not be started or died.
    #[error(transparent)]
    Vm(#[from] infra_vmm::VmError),
    /// The kernel is missing or unusable.
    #[error(transparent)]
    Kernel(#[from] infra_vmm::KernelError),
    /// The image could not be built.
    #[error(transparent)]
    Image(#[from] infra_image::Error),
    /// The object store failed (fetching or sending an image, the kernel or a snapshot).
    #[error(transparent)]
    Store(#[from] infra_store::Error),
    /// A request could not be written to the agent.
    #[error("cannot send a request to the guest agent; the VM is probably gone: {source}")]
    AgentSend {
        /// Cause.
        #[source]
        source: FrameError,
    },
    /// Reading from the agent failed.
    #[error("cannot read from the guest agent; the VM is probably gone: {source}")]
    AgentRead {
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent closed the connection before the answer was complete.
    #[error("the guest agent closed the connection before answering; see the console lines, if any, or retry with --kernel-args infra.log=debug")]
    AgentClosed,
    /// The guest stopped answering (the agent enforces the program's timeout; this is the
    /// host's backstop).
    #[error("no answer from the guest within {secs} s; the guest hung or was overloaded; last console lines:\n{console}")]
    AgentSilent {
        /// Seconds waited.
        secs: u64,
        /// Tail of the serial console.
        console: String,
    },
    /// The agent sent something the protocol does not allow; the run was ended. The guest
    /// runs untrusted code, so this is treated as a hostile or broken guest, never trusted.
    #[error("the guest agent broke the protocol ({violation}); the run was stopped. A guest that does this is broken or compromised: rebuild the image if it repeats")]
    Protocol {
        /// What it did.
        violation: Violation,
    },
    /// The agent refused the request.
    #[error("the agent refused the request ({code}): {message}")]
    Refused {
        /// Protocol error code.
        code: String,
        /// Detail.
        message: String,
    },
    /// The image's agent speaks another protocol generation.
    #[error("the guest agent speaks protocol {theirs} (agent {agent_version}), this host speaks {ours}; rebuild the image with this version (`rootfs create`/`from-docker`)")]
    VersionMismatch {
        /// Our protocol version.
        ours: u32,
        /// Theirs.
        theirs: u32,
        /// Their agent version string.
        agent_version: String,
    },
    /// The agent lacks a protocol feature the request needs (an image whose agent is not this
    /// host's binary, e.g. one booted with `infra.init`).
    #[error("the guest agent (version {agent_version}) does not support {feature}; rebuild the image with this version (`rootfs create`/`from-docker`) or boot it without infra.init")]
    AgentTooOld {
        /// The agent's version string.
        agent_version: String,
        /// The missing feature.
        feature: &'static str,
    },
    /// A workspace file is larger than the caller allows; nothing past the limit was read.
    #[error("workspace file '{path}' is {size} bytes, more than the {max} allowed; raise the limit or write less")]
    FileTooLarge {
        /// Path in the workspace.
        path: String,
        /// Its size as the agent reported it.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// An input file given for the run cannot be opened or read on the host.
    #[error("cannot read input file {path}; check that it exists and is a readable regular file: {source}")]
    InputFile {
        /// The host path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading what is sent to, or writing what is received from, a workspace file failed on
    /// the host side.
    #[error("cannot {action} on the host while copying workspace file '{guest_path}'; check the host file or directory (space, permissions): {source}")]
    HostIo {
        /// `read the data` or `write the data`.
        action: &'static str,
        /// The file's path in the workspace.
        guest_path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An output file could not be created in the output directory.
    #[error(
        "cannot create output file {path}; give an empty directory this user can write: {source}"
    )]
    OutputFile {
        /// The host path.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A host directory (run, cache) is another user's or writable by others.
    #[error(transparent)]
    HostDir(#[from] infra_config::DirError),
    /// A snapshot cannot be used (missing, from other files or another host, corrupted).
    #[error("snapshot {dir} cannot be used: {reason}; recreate it with `infra.operator snapshot create --lang {lang}`")]
    Snapshot {
        /// The snapshot directory.
        dir: std::path::PathBuf,
        /// Its language.
        lang: String,
        /// Why, in a few words.
        reason: String,
    },
    /// A prerequisite is missing (VMM binary, image).
    #[error("{0}")]
    Prerequisite(String),
    /// Bad request from the user.
    #[error("{0}")]
    Usage(String),
}

/// How an agent broke the protocol (see `docs/security.md`, "What the host accepts from the
/// guest"). Part of [`RunError::Protocol`].
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    /// A frame that could not be read or decoded (not JSON, unknown type, over `MAX_FRAME`,
    /// cut short).
    #[error("bad frame: {0}")]
    Frame(#[source] FrameError),
    /// More output on one stream than the cap allows.
    #[error(
        "more than {limit} bytes on {stream}, the --max-output cap plus the truncation marker"
    )]
    OutputOverflow {
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// Bytes allowed on that stream.
        limit: u64,
    },
    /// Too many frames that carried no output for the request.
    #[error("more than {limit} frames without output for the request")]
    TooManyFrames {
        /// Frames allowed.
        limit: u64,
    },
    /// `compile_output` longer than `MAX_COMPILE_OUTPUT`.
    #[error("compile_output of {len} bytes, more than the {max} allowed")]
    CompileOutputTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A numeric field outside its range.
    #[error("{field} = {value} is out of range {min}..={max}")]
    OutOfRange {
        /// Which field.
        field: &'static str,
        /// The value sent.
        value: i64,
        /// Smallest valid value.
        min: i64,
        /// Largest valid value.
        max: i64,
    },
    /// A `file_data` with more bytes than were asked for.
    #[error("a file_data of {got} bytes where at most {asked} were asked for")]
    ChunkTooLarge {
        /// Bytes asked for.
        asked: u64,
        /// Bytes sent.
        got: u64,
    },
    /// A `file_data` whose length is not what the file's reported size leaves for the range
    /// (a short read, or bytes past the end).
    #[error(
        "a file_data of {got} bytes where the file's reported size leaves {expected} for the range"
    )]
    ChunkMismatch {
        /// Bytes the range must hold.
        expected: u64,
        /// Bytes sent.
        got: u64,
    },
    /// A file's size changed between chunks, or differs from its listing.
    #[error("the size of a file changed from {was} to {now} bytes while it was read")]
    SizeChanged {
        /// Size first reported (or listed).
        was: u64,
        /// Size reported later.
        now: u64,
    },
    /// A listing with more entries than were asked for.
    #[error("a file_list of {got} entries where at most {max} were asked for")]
    TooManyEntries {
        /// Entries sent.
        got: usize,
        /// Entries allowed.
        max: u64,
    },
    /// A listed path that is not a plain relative path (could name a file outside the
    /// directory it is joined to).
    #[error("a listed path {path} is refused: {problem}")]
    UnsafePath {
        /// The path, quoted and escaped, cut at 80 characters.
        path: String,
        /// What is wrong with it.
        problem: infra_protocol::PathProblem,
    },
    /// A listed path that appears twice, or is both a file and the parent of another.
    #[error("a listed path {path} appears twice or is both a file and a directory")]
    PathConflict {
        /// The path, quoted and escaped, cut at 80 characters.
        path: String,
    },
    /// A reply that does not answer the request (e.g. `ok` to `hello`).
    #[error("a `{got}` reply where `{expected}` was expected")]
    Unexpected {
        /// What the request calls for.
        expected: &'static str,
        /// The reply type received.
        got: &'static str,
    },
}

impl From<Violation> for RunError {
    fn from(violation: Violation) -> Self {
        RunError::Protocol { violation }
    }
}

impl RunError {
    /// The kind of this failure (every variant named). A guest that breaks the protocol, goes
    /// silent or closes is a sandbox failure, never a crash of the host side.
    pub fn kind(&self) -> infra_config::ErrorKind {
        use infra_config::ErrorKind as K;
        match self {
            Self::Vm(e) => e.kind(),
            Self::Kernel(e) => e.kind(),
            Self::Image(e) => e.kind(),
            Self::Store(e) => e.kind(),
            Self::HostDir(e) => e.kind(),
            Self::AgentSend { .. }
            | Self::AgentRead { .. }
            | Self::AgentClosed
            | Self::AgentSilent { .. }
            | Self::Protocol { .. }
            | Self::Refused { .. }
            | Self::FileTooLarge { .. } => K::Sandbox,
            Self::Snapshot { .. } => K::Refused,
            Self::VersionMismatch { .. } | Self::AgentTooOld { .. } | Self::Prerequisite(_) => {
                K::Prerequisite
            }
            // An input file that cannot be read is a bad flag or field, like a bad name.
            Self::Usage(_) | Self::InputFile { .. } => K::Usage,
            Self::HostIo { .. } | Self::OutputFile { .. } => K::Failure,
        }
    }
}
