//! Error types, one enum per layer.

use std::io;
use std::path::PathBuf;

use infra_protocol::ErrorCode;

/// A `--listen` value that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("invalid listen address '{uri}': {reason}")]
pub struct ListenParseError {
    /// The text given.
    pub uri: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Why the agent could not start or stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A TCP or Unix listener could not be bound.
    #[error("cannot listen on {uri}: {source}")]
    Bind {
        /// The listen address.
        uri: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// No listener could be set up (all were skipped or none was given).
    #[error("no usable listen address (tried: {tried})")]
    NoListener {
        /// The addresses that were tried, comma-separated.
        tried: String,
    },
    /// A TCP listen address that is not loopback was given without a token.
    #[error(
        "refusing to listen on {uri} without a token: anyone who can reach this address could \
         run code; pass --token-file FILE (the host sends its content in hello), or listen on \
         127.0.0.1, vsock or serial instead"
    )]
    TokenRequired {
        /// The listen address.
        uri: String,
    },
    /// The token is empty (an empty or blank token file).
    #[error("the agent token is empty: put a long random secret in the --token-file")]
    EmptyToken,
    /// The workspace directory could not be prepared.
    #[error("cannot prepare workspace {path}: {source}")]
    Workspace {
        /// The workspace path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: io::Error,
    },
    /// A signal handler (SIGCHLD, SIGTERM) could not be installed.
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] io::Error),
}

/// Why a workspace file operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path is absolute, has `..`, is empty, or goes through a symlink.
    #[error("path '{path}' refused: {reason}")]
    Refused {
        /// The requested path.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// The file or a parent directory does not exist.
    #[error("'{path}' not found in the workspace")]
    NotFound {
        /// The requested path.
        path: String,
    },
    /// The file is larger than one frame can carry.
    #[error("'{path}' is {size} bytes; at most {max} can be sent")]
    TooLarge {
        /// The requested path.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Any other system error.
    #[error("'{path}': {source}")]
    Io {
        /// The requested path.
        path: String,
        /// The system error.
        #[source]
        source: io::Error,
    },
}

impl FileError {
    /// The protocol error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            FileError::Refused { .. } => ErrorCode::PathRefused,
            FileError::NotFound { .. } => ErrorCode::NotFound,
            FileError::TooLarge { .. } => ErrorCode::TooLarge,
            FileError::Io { .. } => ErrorCode::Io,
        }
    }
}

/// Why an exec request was refused before anything ran.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The language is not in the table.
    #[error(transparent)]
    UnknownLanguage(#[from] infra_languages::Error),
    /// The working directory or source file could not be prepared.
    #[error(transparent)]
    File(#[from] FileError),
    /// An argument or environment entry cannot be passed to a process.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which field.
        what: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl ExecError {
    /// The protocol error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            ExecError::UnknownLanguage(_) => ErrorCode::UnknownLanguage,
            ExecError::File(f) => f.code(),
            ExecError::Invalid { .. } => ErrorCode::BadRequest,
        }
    }
}

impl AgentError {
    /// The kind of this failure (every variant named).
    pub fn kind(&self) -> infra_config::ErrorKind {
        use infra_config::ErrorKind as K;
        match self {
            // Flags that cannot be used as given: a public TCP address needs --token-file.
            Self::TokenRequired { .. } | Self::EmptyToken => K::Usage,
            Self::Bind { .. }
            | Self::NoListener { .. }
            | Self::Workspace { .. }
            | Self::Signal(_) => K::Failure,
        }
    }
}
