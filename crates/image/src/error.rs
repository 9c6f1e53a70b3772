//! Errors of the image builder: what happened, what to do, and the cause underneath.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop an image build. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The reference could not be parsed.
    #[error("image reference '{reference}' is invalid: {reason}")]
    InvalidReference {
        /// What the user typed.
        reference: String,
        /// Why it was refused.
        reason: String,
    },
    /// The registry has no such repository or tag.
    #[error("image {reference} was not found in the registry: check the name and tag")]
    NotFound {
        /// The normalized reference.
        reference: String,
        /// The registry's answer.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The registry refused our credentials (or anonymous access).
    #[error(
        "registry {registry} denied access to {reference}: run `docker login {registry}` or check ~/.docker/config.json"
    )]
    AuthDenied {
        /// Registry host.
        registry: String,
        /// The normalized reference.
        reference: String,
        /// The registry's answer.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No connection to the registry.
    #[error(
        "cannot reach registry {registry}: check the network, or build from a local daemon (--source docker) or an archive (docker-archive:PATH)"
    )]
    Unreachable {
        /// Registry host.
        registry: String,
        /// The connection error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Any other registry failure.
    #[error("registry request for {reference} failed")]
    Registry {
        /// The normalized reference.
        reference: String,
        /// The client error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The image index has no manifest for the requested platform.
    #[error("{reference} has no image for platform {platform} (available: {available})")]
    PlatformNotFound {
        /// The normalized reference.
        reference: String,
        /// What was asked for.
        platform: String,
        /// What the index offers.
        available: String,
    },
    /// Content did not hash to its digest.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}; the download or archive is corrupt, retry or rebuild it")]
    DigestMismatch {
        /// Which blob or layer.
        what: String,
        /// Digest from the manifest or config.
        expected: String,
        /// Digest of the bytes received.
        actual: String,
    },
    /// A layer could not be decompressed or parsed.
    #[error("layer {layer} is corrupt or truncated: re-pull the image or rebuild the archive")]
    CorruptLayer {
        /// Layer digest or file name.
        layer: String,
        /// The decoder's error.
        #[source]
        source: std::io::Error,
    },
    /// A tar entry tried to write outside the image root.
    #[error(
        "refusing entry '{entry}' in layer {layer}: {reason}; the image is malformed or hostile"
    )]
    HostileEntry {
        /// Layer digest or file name.
        layer: String,
        /// The entry's path as written in the tar.
        entry: String,
        /// What it tried to do.
        reason: String,
    },
    /// A layer expanded past one of the unpack limits (compression or sparse-file bomb, or a
    /// genuinely huge image).
    #[error("layer {layer}: {what} exceeds the limit of {limit}; the image is hostile or larger than allowed (raise {flag} only for images you trust)")]
    LimitExceeded {
        /// Layer digest or file name.
        layer: String,
        /// Which quantity.
        what: &'static str,
        /// The limit, with its unit.
        limit: String,
        /// The flag that sets it.
        flag: &'static str,
    },
    /// A fixed `--size` is too small for the content.
    #[error("the image needs about {needed_mb} MB but --size is {size_mb} MB: use a larger --size or --size auto")]
    TooSmall {
        /// What the user asked for.
        size_mb: u64,
        /// What the content needs (estimate).
        needed_mb: u64,
    },
    /// A host tool is missing.
    #[error("{tool} is not installed: install the Debian package '{package}' (apt-get install {package})")]
    MissingTool {
        /// Program name.
        tool: String,
        /// Debian package providing it.
        package: String,
    },
    /// A host tool ran and failed.
    #[error("{tool} failed ({status}): {output}")]
    ToolFailed {
        /// Program name.
        tool: String,
        /// Exit status text.
        status: String,
        /// The tail of its stderr/stdout.
        output: String,
    },
    /// The disk filled up.
    #[error(
        "no space left on device while writing {path}: free space there (df -h {dir}) and retry"
    )]
    DiskFull {
        /// The file being written.
        path: PathBuf,
        /// Its directory, for the df hint.
        dir: PathBuf,
    },
    /// A host directory (images, cache) is another user's or writable by others.
    #[error(transparent)]
    HostDir(#[from] infra_config::DirError),
    /// A filesystem operation failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What we were doing (verb phrase).
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The Docker/Podman daemon failed or is not reachable.
    #[error("docker daemon: {context}: is dockerd running and /var/run/docker.sock (or DOCKER_HOST) reachable?")]
    Daemon {
        /// What we asked the daemon.
        context: String,
        /// The client error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A local archive or OCI layout is malformed.
    #[error("{path}: {reason}")]
    Archive {
        /// Archive or directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The builder must run as root.
    #[error("building a rootfs needs root to keep file owners, setuid bits and device nodes: re-run with sudo")]
    NeedRoot,
    /// The agent binary would not run inside other images.
    #[error("agent binary {path} is dynamically linked and would not run inside the image: use a static build (the workspace's default) or pass --agent PATH")]
    AgentNotStatic {
        /// The binary.
        path: PathBuf,
    },
    /// The language is not in the table.
    #[error(transparent)]
    Language(#[from] infra_languages::Error),
    /// A flag combination or value makes no sense.
    #[error("{0}")]
    Usage(String),
    /// A base OS mirror cannot be reached.
    #[error("{what} mirror {mirror} is not reachable from this host: pass --mirror with a reachable mirror, or use --base debian")]
    MirrorUnreachable {
        /// Which distribution.
        what: String,
        /// The URL tried.
        mirror: String,
        /// The connection error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// Wraps an I/O error with the path, turning ENOSPC into [`Error::DiskFull`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(nix::libc::ENOSPC) {
            let dir = path
                .parent()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            return Error::DiskFull { path, dir };
        }
        Error::Io {
            action,
            path,
            source,
        }
    }
}

/// Adds path context to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, action: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(action, path, e))
    }
}

impl Error {
    /// The kind of this failure (every variant named).
    pub fn kind(&self) -> infra_config::ErrorKind {
        use infra_config::ErrorKind as K;
        match self {
            Self::HostileEntry { .. }
            | Self::CorruptLayer { .. }
            | Self::DigestMismatch { .. }
            | Self::Archive { .. }
            | Self::InvalidReference { .. } => K::Refused,
            Self::NotFound { .. } | Self::PlatformNotFound { .. } => K::NotFound,
            Self::LimitExceeded { .. } => K::TooLarge,
            Self::MissingTool { .. }
            | Self::NeedRoot
            | Self::AuthDenied { .. }
            | Self::AgentNotStatic { .. } => K::Prerequisite,
            Self::HostDir(e) => e.kind(),
            Self::Unreachable { .. } | Self::Daemon { .. } | Self::MirrorUnreachable { .. } => {
                K::Unavailable
            }
            Self::Usage(_) | Self::TooSmall { .. } => K::Usage,
            Self::Language(e) => e.kind(),
            Self::Registry { .. }
            | Self::ToolFailed { .. }
            | Self::DiskFull { .. }
            | Self::Io { .. } => K::Failure,
        }
    }
}
