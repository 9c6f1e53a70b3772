//! Errors of kernels and VMMs, each saying what to do next.

use std::path::{Path, PathBuf};

/// Kernel fetch/import/initramfs failures.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel image or a module is not in a format we can use.
    #[error("{0}")]
    Format(String),
    /// A module the guest cannot boot without is not in the kernel's module tree.
    #[error("kernel module {0} is neither built in nor in the module tree; use a kernel with virtio-mmio and virtio-blk (Debian's linux-image-cloud-amd64 has them)")]
    MissingModule(String),
    /// No kernel has been installed yet.
    #[error("no guest kernel at {0}; run `infra.operator kernel fetch` (Debian cloud kernel) or `infra.operator kernel import PATH`")]
    NotInstalled(PathBuf),
    /// A host directory (cache) is missing, shared or another user's.
    #[error(transparent)]
    HostDir(#[from] infra_config::DirError),
    /// `apt-get download` or `dpkg -x` failed.
    #[error("cannot fetch the kernel package {package}: {detail}; check that apt can reach a Debian mirror (`apt-get update`), or import a vmlinux with `kernel import PATH`")]
    Fetch {
        /// Debian package name.
        package: String,
        /// What the tool said.
        detail: String,
    },
}

impl KernelError {
    /// Wraps an I/O error with its path.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        KernelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// VM start/run failures.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The VMM binary is not installed or not executable.
    #[error("{binary} not found: {hint}")]
    MissingVmm {
        /// What was looked for.
        binary: String,
        /// How to get it.
        hint: String,
    },
    /// The VMM could not be started or configured.
    #[error("{backend} failed to start: {detail}")]
    Start {
        /// `qemu` or `firecracker`.
        backend: &'static str,
        /// Cause, with the VMM's own words when it printed any.
        detail: String,
    },
    /// The VMM's API answered with an error.
    #[error("firecracker API {method} {path} failed with HTTP {status}: {body}")]
    Api {
        /// HTTP method.
        method: String,
        /// Request path.
        path: String,
        /// HTTP status.
        status: u16,
        /// Fault message from Firecracker.
        body: String,
    },
    /// The guest did not answer in time.
    #[error("the guest agent was not ready after {secs} s ({backend}, {accel}); last console lines:\n{console}")]
    BootTimeout {
        /// Seconds waited.
        secs: u64,
        /// Backend name.
        backend: &'static str,
        /// Acceleration used.
        accel: String,
        /// Tail of the serial console.
        console: String,
    },
    /// The VMM exited (crash, kill, guest panic) before or while the agent was in use.
    #[error("the VM exited unexpectedly ({status}{vmm_said}){console}")]
    Exited {
        /// Exit status of the VMM process.
        status: String,
        /// The VMM's own last words (e.g. QEMU's "KVM internal error"), prefixed with ": ".
        vmm_said: String,
        /// Tail of the serial console, with its heading (empty when the guest printed nothing).
        console: String,
    },
    /// Saving or restoring a VM's state failed.
    #[error("{backend} snapshot failed: {detail}")]
    Snapshot {
        /// `qemu` or `firecracker`.
        backend: &'static str,
        /// What happened, with the VMM's own words.
        detail: String,
    },
    /// The run directory is another user's or writable by others.
    #[error(transparent)]
    HostDir(#[from] infra_config::DirError),
    /// Host-side I/O (temp dir, sockets).
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
}

impl VmError {
    /// Wraps an I/O error with a description.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        VmError::Io {
            what: what.into(),
            source,
        }
    }
}

impl KernelError {
    /// The kind of this failure (every variant named).
    pub fn kind(&self) -> infra_config::ErrorKind {
        use infra_config::ErrorKind as K;
        match self {
            Self::Io { .. } => K::Failure,
            Self::Format(_) => K::Refused,
            Self::MissingModule(_) | Self::NotInstalled(_) => K::Prerequisite,
            Self::HostDir(e) => e.kind(),
            Self::Fetch { .. } => K::Unavailable,
        }
    }
}

impl VmError {
    /// The kind of this failure (every variant named).
    pub fn kind(&self) -> infra_config::ErrorKind {
        use infra_config::ErrorKind as K;
        match self {
            Self::MissingVmm { .. } => K::Prerequisite,
            Self::Start { .. }
            | Self::Api { .. }
            | Self::BootTimeout { .. }
            | Self::Exited { .. }
            | Self::Snapshot { .. } => K::Sandbox,
            Self::HostDir(e) => e.kind(),
            Self::Io { .. } => K::Failure,
        }
    }
}
