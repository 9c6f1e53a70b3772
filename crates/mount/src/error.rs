//! Errors of the mount: [`MountError`] for setting it up (shown by the CLI, one line each),
//! [`FsError`] for file system operations, and [`errno`], the one place where an error becomes
//! the errno a program sees.

use std::path::PathBuf;

use fuser::Errno;
use infra_store::Error as StoreError;

/// Result alias of the setup functions.
pub type Result<T, E = MountError> = std::result::Result<T, E>;

/// Why a mount could not be set up (reported before the daemon detaches).
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A `-o` option is not valid.
    #[error("invalid mount option '{option}': {reason}")]
    Option {
        /// The option as given.
        option: String,
        /// What is accepted.
        reason: String,
    },
    /// The source is not `s3://BUCKET[/PREFIX]` (or `BUCKET`).
    #[error("invalid bucket '{value}': {reason}")]
    Source {
        /// As given.
        value: String,
        /// Why.
        reason: String,
    },
    /// The mount point cannot be used.
    #[error("cannot mount on {}: {reason}", path.display())]
    Mountpoint {
        /// The directory.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The bucket could not be reached or read when checked before mounting.
    #[error(transparent)]
    Store {
        /// What the store said.
        #[from]
        source: StoreError,
    },
    /// The first request to the bucket did not finish in time.
    #[error(
        "the bucket did not answer within {seconds} s: check the endpoint (url=) and that the \
         server is running, or raise timeout="
    )]
    ProbeTimeout {
        /// The limit.
        seconds: u64,
    },
    /// The kernel mount failed.
    #[error("mounting {} failed: {hint}", path.display())]
    Fuse {
        /// Mount point.
        path: PathBuf,
        /// What to check.
        hint: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Unmounting failed.
    #[error("unmounting {} failed: {hint}", path.display())]
    Unmount {
        /// Mount point.
        path: PathBuf,
        /// What to do.
        hint: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A local file (cache directory, log) could not be used.
    #[error("cannot {op} {}", path.display())]
    Local {
        /// What we were doing.
        op: &'static str,
        /// Path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl MountError {
    /// The kind of this failure, for the CLI's exit code (every variant named).
    pub fn kind(&self) -> infra_config::ErrorKind {
        use infra_config::ErrorKind as K;
        match self {
            Self::Option { .. } | Self::Source { .. } | Self::Mountpoint { .. } => K::Usage,
            Self::Store { source } => source.kind(),
            Self::ProbeTimeout { .. } => K::Unavailable,
            Self::Fuse { .. } => K::Prerequisite,
            Self::Unmount { .. } | Self::Local { .. } => K::Failure,
        }
    }
}

/// Why one file system operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The store refused or failed the request (after its retries).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A request did not finish within the `timeout=` option.
    #[error("{op} did not finish within the timeout")]
    TimedOut {
        /// The operation.
        op: &'static str,
    },
    /// No such file or directory.
    #[error("not found")]
    NotFound,
    /// The name exists.
    #[error("exists")]
    Exists,
    /// The directory is not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// A directory where a file is needed.
    #[error("is a directory")]
    IsDir,
    /// A file where a directory is needed.
    #[error("not a directory")]
    NotDir,
    /// The mount is read-only.
    #[error("read-only mount")]
    ReadOnly,
    /// A name that cannot be an object key component.
    #[error("invalid name: {0}")]
    Name(infra_store::KeyProblem),
    /// The operation is not supported on a bucket (hard links, device nodes, exchange).
    #[error("not supported on a bucket")]
    Unsupported,
    /// An argument is not valid (offsets, flags).
    #[error("invalid argument")]
    Invalid,
    /// Unknown file handle or inode.
    #[error("stale handle")]
    BadHandle,
    /// The staging directory reached `cache_size=`.
    #[error("the staging directory is full")]
    CacheFull,
    /// A local (staging file) I/O error.
    #[error("local {op} failed")]
    Local {
        /// What we were doing.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of file system operations.
pub type FsResult<T> = std::result::Result<T, FsError>;

/// The errno of an error: the one mapping point (every variant of ours and of the store's
/// error named, no wildcard, so a new variant must be placed here).
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::Store(s) => store_errno(s),
        FsError::TimedOut { .. } => Errno::EIO,
        FsError::NotFound => Errno::ENOENT,
        FsError::Exists => Errno::EEXIST,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::ReadOnly => Errno::EROFS,
        FsError::Name(p) => match p {
            infra_store::KeyProblem::ComponentTooLong => Errno::ENAMETOOLONG,
            infra_store::KeyProblem::Empty
            | infra_store::KeyProblem::Absolute
            | infra_store::KeyProblem::ParentComponent
            | infra_store::KeyProblem::DotComponent
            | infra_store::KeyProblem::EmptyComponent
            | infra_store::KeyProblem::Nul
            | infra_store::KeyProblem::Slash
            | infra_store::KeyProblem::Reserved
            | infra_store::KeyProblem::Link { .. } => Errno::EINVAL,
        },
        FsError::Unsupported => Errno::EPERM,
        FsError::Invalid => Errno::EINVAL,
        FsError::BadHandle => Errno::EBADF,
        FsError::CacheFull => Errno::ENOSPC,
        // The staging disk being full is the program's to know; anything else about our
        // cache directory (missing, not a directory, permissions) is not about its file,
        // so `EEXIST` or `ENOTDIR` would mislead it: EIO, with the cause in the log.
        FsError::Local { source, .. } => match source.raw_os_error().map(Errno::from_i32) {
            Some(e @ (Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG)) => e,
            Some(_) | None => Errno::EIO,
        },
    }
}

fn store_errno(e: &StoreError) -> Errno {
    match e {
        StoreError::NoSuchKey { .. } | StoreError::NoSuchBucket { .. } => Errno::ENOENT,
        StoreError::AccessDenied { .. }
        | StoreError::BadCredentials { .. }
        | StoreError::NoCredentials { .. }
        | StoreError::WrongRegion { .. } => Errno::EACCES,
        // Endpoint down or failing after the SDK's retries (throttling included).
        StoreError::Unreachable { .. }
        | StoreError::Service { .. }
        | StoreError::Request { .. } => Errno::EIO,
        // The object changed under an open file (If-Match failed).
        StoreError::Changed { .. } => Errno::ESTALE,
        StoreError::Unsupported { .. } => Errno::EOPNOTSUPP,
        StoreError::ChecksumMismatch { .. }
        | StoreError::PartMismatch { .. }
        | StoreError::SourceMismatch { .. }
        | StoreError::Corrupt { .. }
        | StoreError::UnsafeKeysSkipped { .. } => Errno::EIO,
        StoreError::UnsafeKey { .. } | StoreError::Invalid { .. } | StoreError::Config { .. } => {
            Errno::EINVAL
        }
        StoreError::DiskFull { .. } => Errno::ENOSPC,
        StoreError::Io { source, .. } => source
            .raw_os_error()
            .map(Errno::from_i32)
            .unwrap_or(Errno::EIO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_as_documented() {
        let nf = StoreError::NoSuchKey {
            target: "s3://b/k".into(),
            version: None,
        };
        assert_eq!(errno(&FsError::Store(nf)), Errno::ENOENT);
        let denied = StoreError::AccessDenied {
            op: "GetObject",
            target: "s3://b/k".into(),
            message: None,
        };
        assert_eq!(errno(&FsError::Store(denied)), Errno::EACCES);
        let down = StoreError::Unreachable {
            endpoint: "http://127.0.0.1:1".into(),
            source: std::io::Error::other("refused").into(),
        };
        assert_eq!(errno(&FsError::Store(down)), Errno::EIO);
        let slow = StoreError::Service {
            op: "PutObject",
            target: "s3://b/k".into(),
            status: 503,
            code: "SlowDown".into(),
            message: None,
        };
        assert_eq!(errno(&FsError::Store(slow)), Errno::EIO);
        assert_eq!(errno(&FsError::TimedOut { op: "GetObject" }), Errno::EIO);
        assert_eq!(errno(&FsError::NotEmpty), Errno::ENOTEMPTY);
        assert_eq!(errno(&FsError::CacheFull), Errno::ENOSPC);
        let local = |n| FsError::Local {
            op: "create the cache directory",
            source: std::io::Error::from_raw_os_error(n),
        };
        assert_eq!(errno(&local(nix::libc::ENOSPC)), Errno::ENOSPC);
        assert_eq!(errno(&local(nix::libc::EEXIST)), Errno::EIO);
        assert_eq!(errno(&local(nix::libc::ENOTDIR)), Errno::EIO);
        assert_eq!(
            errno(&FsError::Name(infra_store::KeyProblem::ComponentTooLong)),
            Errno::ENAMETOOLONG
        );
    }
}
