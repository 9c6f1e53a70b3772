//! Typed errors of the store. Each variant carries what the user needs to act on it; the
//! `Display` text is one line (what happened, then what to do), the cause is the `source`.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Hints from the seed's troubleshooting section, shown with "access denied".
pub const ACCESS_DENIED_HINTS: &str = "check that the IAM policy allows s3:GetObject, \
s3:PutObject, s3:ListBucket and s3:DeleteObject on the bucket and its objects, that the bucket \
policy allows access, and that the bucket is in the region you use (--region / AWS_REGION); \
`aws sts get-caller-identity` shows which identity is used";

/// Which credential problem the server reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialProblem {
    /// The access key id is not known to the server (`InvalidAccessKeyId`).
    UnknownAccessKey,
    /// The signature does not match: wrong secret key (`SignatureDoesNotMatch`).
    WrongSecret,
    /// The session token expired (`ExpiredToken`, `TokenRefreshRequired`).
    Expired,
    /// The session token is malformed or not valid (`InvalidToken`).
    InvalidToken,
}

impl std::fmt::Display for CredentialProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::UnknownAccessKey => {
                "the access key id is not known to the server: check AWS_ACCESS_KEY_ID or the \
                 profile's aws_access_key_id (AWS_PROFILE)"
            }
            Self::WrongSecret => {
                "the signature does not match: the secret access key is wrong \
                 (AWS_SECRET_ACCESS_KEY or the profile's aws_secret_access_key)"
            }
            Self::Expired => {
                "the session credentials have expired: refresh them (`aws sso login`, a new \
                 AWS_SESSION_TOKEN, or the role's web identity token)"
            }
            Self::InvalidToken => {
                "the session token is not valid: check AWS_SESSION_TOKEN or the profile's \
                 aws_session_token"
            }
        })
    }
}

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No credentials could be loaded from any source of the standard chain.
    #[error(
        "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, choose a \
         profile with AWS_PROFILE (`aws configure`, `aws sso login`), or run with an instance or \
         task role; without a bucket the local store needs none"
    )]
    NoCredentials {
        /// What the credential chain reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The server refused the credentials.
    #[error("{op} on {target} was refused: {problem}; `aws sts get-caller-identity` shows which identity is used")]
    BadCredentials {
        /// Operation (`GetObject`, `ListObjectsV2`, ...).
        op: &'static str,
        /// `s3://bucket/key` the operation was for.
        target: String,
        /// What is wrong with them.
        problem: CredentialProblem,
    },

    /// The server refused the request (AWS: not allowed; some servers also answer this for an
    /// unknown key or a wrong secret, which their message then says).
    #[error("access denied for {op} on {target}{said}: {hints}",
        said = message.as_deref().map(|m| format!(" (the server says: {m})")).unwrap_or_default(),
        hints = ACCESS_DENIED_HINTS)]
    AccessDenied {
        /// Operation (`GetObject`, ...).
        op: &'static str,
        /// `s3://bucket/key`.
        target: String,
        /// The server's message (Garage: `Forbidden: Invalid signature`, `No such key: ...`).
        message: Option<String>,
    },

    /// The bucket does not exist.
    #[error(
        "bucket {bucket} does not exist: check the name (--bucket, BUCKET, S3_BUCKET) and the \
         region, or create it with `infra.operator store init`"
    )]
    NoSuchBucket {
        /// Bucket name.
        bucket: String,
    },

    /// The object (or the given version of it) does not exist.
    #[error(
        "{target} not found{version}: `infra.operator store ls` lists what the store holds; \
         upload it with `infra.operator store upload` or `rootfs upload`",
        version = version.as_deref().map(|v| format!(" (version {v})")).unwrap_or_default()
    )]
    NoSuchKey {
        /// `s3://bucket/key` or the local path of the object.
        target: String,
        /// Version asked for, if any.
        version: Option<String>,
    },

    /// The bucket lives in another region than the one requests are signed for.
    #[error(
        "bucket {bucket} is not in region {region}{actual}{said}: pass --region (or set \
         AWS_REGION) to the bucket's region; keep hosts and bucket in one region to avoid \
         transfer costs",
        actual = actual.as_deref().map(|r| format!(" but in {r}")).unwrap_or_default(),
        said = message.as_deref().map(|m| format!(" (the server says: {m})")).unwrap_or_default()
    )]
    WrongRegion {
        /// Bucket name.
        bucket: String,
        /// Region used to sign.
        region: String,
        /// Region the server named (`x-amz-bucket-region`), when it did.
        actual: Option<String>,
        /// The server's message.
        message: Option<String>,
    },

    /// The endpoint cannot be reached (connection refused, DNS, timeout, TLS).
    #[error(
        "cannot reach the object store at {endpoint}: check --endpoint-url / S3_ENDPOINT_URL and \
         that the server is running and reachable; interrupted transfers resume when run again"
    )]
    Unreachable {
        /// Endpoint URL (or `AWS S3 (region)`).
        endpoint: String,
        /// Connection error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The server (or the local store) does not implement a feature.
    #[error("{feature} is not supported by {backend}{detail}", detail = detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Unsupported {
        /// Feature (`object versions`, `lifecycle rules`, ...).
        feature: &'static str,
        /// `the local store` or `the server at URL`.
        backend: String,
        /// Server error code or message.
        detail: Option<String>,
    },

    /// The downloaded data does not have the sha256 recorded at upload.
    #[error(
        "checksum mismatch for {target}: expected sha256 {expected}, got {actual}; the download \
         was discarded and {kept}; upload the object again if it is corrupt in the store",
        kept = match path { Some(p) => format!("{} was left as it was", p.display()), None => "nothing was written".to_string() }
    )]
    ChecksumMismatch {
        /// Object.
        target: String,
        /// sha256 from the object's metadata.
        expected: String,
        /// sha256 of what arrived.
        actual: String,
        /// Local file that was kept unchanged.
        path: Option<PathBuf>,
    },

    /// One part of a download does not have the sha256 recorded for it at upload.
    #[error(
        "checksum mismatch for {target}: {detail}; the download was discarded and {kept}; upload \
         the object again if it is corrupt in the store",
        kept = match path { Some(p) => format!("{} was left as it was", p.display()), None => "nothing was written".to_string() }
    )]
    PartMismatch {
        /// Object.
        target: String,
        /// 1-based part number.
        part: u64,
        /// `part N of M (bytes A..B) has sha256 X, its part list says Y`.
        detail: String,
        /// Local file that was kept unchanged.
        path: Option<PathBuf>,
    },

    /// A local file does not have the sha256 its manifest (or the hash cache) claims: it changed
    /// after the manifest was written. Nothing was stored.
    #[error(
        "{} does not match its recorded sha256 (expected {expected}, read {actual}): it changed \
         after its manifest was written; rebuild the image or remove the stale manifest, then \
         upload again (nothing was stored)",
        path.display()
    )]
    SourceMismatch {
        /// Local file.
        path: PathBuf,
        /// Recorded sha256.
        expected: String,
        /// sha256 of what was read.
        actual: String,
    },

    /// The object changed on the server while it was being downloaded.
    #[error("{target} changed in the store during the transfer: run the command again")]
    Changed {
        /// Object.
        target: String,
    },

    /// The object is not in a form we can read (bad zstd stream, short body).
    #[error("{target} is corrupt: {reason}; upload it again")]
    Corrupt {
        /// Object.
        target: String,
        /// What is wrong.
        reason: String,
    },

    /// Another server-side error, with the code the server sent.
    #[error("{op} on {target} failed: {code}{message} (HTTP {status}); retry, or check the server's log", message = message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Service {
        /// Operation.
        op: &'static str,
        /// `s3://bucket/key`.
        target: String,
        /// HTTP status (0 when unknown).
        status: u16,
        /// S3 error code (`InternalError`, `SlowDown`, ...).
        code: String,
        /// Server message.
        message: Option<String>,
    },

    /// The request failed on our side or with an unparseable response.
    #[error("{op} on {target} failed")]
    Request {
        /// Operation.
        op: &'static str,
        /// `s3://bucket/key`.
        target: String,
        /// Underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The disk filled up while writing.
    #[error("no space left on the device while writing {}: free space and run the command again (the transfer resumes)", path.display())]
    DiskFull {
        /// File being written.
        path: PathBuf,
    },

    /// Any other local I/O error.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What we were doing (`read`, `create`, `rename`, ...).
        op: &'static str,
        /// Path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// A bucket URL, path or setting is not valid.
    #[error("invalid {what} '{value}': {reason}")]
    Invalid {
        /// What was given (`bucket`, `--include pattern`, `part size`).
        what: &'static str,
        /// The value.
        value: String,
        /// Why it is refused and what is accepted.
        reason: String,
    },

    /// An object key cannot be used as a local path (see [`crate::keys`]).
    #[error(
        "object key '{}' is not safe as a local path: {problem}; nothing was written for it \
         (rename or delete the object in the store)",
        crate::keys::display_key(key)
    )]
    UnsafeKey {
        /// The key as the store gave it.
        key: String,
        /// What is wrong with it.
        problem: crate::keys::KeyProblem,
    },

    /// A sync or download skipped keys that are not safe as local paths; everything else was
    /// transferred.
    #[error(
        "{} object key{} not safe as local paths and {} skipped ({}); the other objects were \
         transferred; rename or delete these objects in {source_desc}",
        keys.len(),
        if keys.len() == 1 { " is" } else { "s are" },
        if keys.len() == 1 { "was" } else { "were" },
        crate::keys::list_for_message(keys)
    )]
    UnsafeKeysSkipped {
        /// The skipped keys.
        keys: Vec<String>,
        /// The store they came from.
        source_desc: String,
    },

    /// The config file cannot be read or parsed.
    #[error("config file {} is not valid: {reason}", path.display())]
    Config {
        /// Config file.
        path: PathBuf,
        /// Parse error.
        reason: String,
    },
}

impl Error {
    /// Wraps an I/O error, turning ENOSPC into [`Error::DiskFull`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(nix::libc::ENOSPC) {
            return Self::DiskFull { path };
        }
        Self::Io { op, path, source }
    }

    /// True when running the same command again can succeed without changing anything
    /// (endpoint down, server error, disk full after cleaning up).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Changed { .. } | Self::Request { .. } => true,
            Self::Service { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// Adds path context to `std::io::Result`.
pub(crate) trait IoContext<T> {
    /// Maps the error to [`Error::io`].
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}

impl Error {
    /// The kind of this failure (every variant named).
    pub fn kind(&self) -> infra_config::ErrorKind {
        use infra_config::ErrorKind as K;
        match self {
            Self::NoSuchBucket { .. } | Self::NoSuchKey { .. } => K::NotFound,
            Self::ChecksumMismatch { .. }
            | Self::PartMismatch { .. }
            | Self::SourceMismatch { .. }
            | Self::Corrupt { .. }
            | Self::UnsafeKey { .. }
            | Self::UnsafeKeysSkipped { .. } => K::Refused,
            Self::NoCredentials { .. }
            | Self::BadCredentials { .. }
            | Self::AccessDenied { .. }
            | Self::WrongRegion { .. }
            | Self::Unsupported { .. } => K::Prerequisite,
            Self::Unreachable { .. } => K::Unavailable,
            Self::Invalid { .. } | Self::Config { .. } => K::Usage,
            Self::Changed { .. } => K::Conflict,
            Self::Service { .. }
            | Self::Request { .. }
            | Self::DiskFull { .. }
            | Self::Io { .. } => K::Failure,
        }
    }
}
