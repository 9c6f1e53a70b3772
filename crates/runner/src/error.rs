//! Run failures, each saying what to do.

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
    /// The protocol conversation failed.
    #[error("agent: {0}")]
    Agent(String),
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
