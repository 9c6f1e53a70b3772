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
    /// A host directory (run, cache) is another user's or writable by others.
    #[error(transparent)]
    HostDir(#[from] infra_config::DirError),
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
            Self::HostDir(e) => e.kind(),
            Self::AgentSend { .. }
            | Self::AgentRead { .. }
            | Self::AgentClosed
            | Self::AgentSilent { .. }
            | Self::Protocol { .. }
            | Self::Refused { .. } => K::Sandbox,
            Self::VersionMismatch { .. } | Self::Prerequisite(_) => K::Prerequisite,
            Self::Usage(_) => K::Usage,
        }
    }
}
