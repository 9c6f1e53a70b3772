//! The one error type of the crate, and its classification ([`ErrorKind`]) so the HTTP server
//! maps errors to status codes in one place.
//!
//! Each `Display` text is one line: what happened, then what to do; the cause is the
//! `source`. Store and database errors are classified when they are wrapped (into an
//! `…Unavailable` variant or not), so [`FilesError::kind`] is a plain match with no wildcard.

use std::path::PathBuf;

use crate::names::FilenameProblem;

/// Result alias of this crate.
pub type Result<T, E = FilesError> = std::result::Result<T, E>;

/// What kind of failure an error is, for mapping to an HTTP status (400, 404, 413, 409, 503,
/// 500) and an OpenAI-style error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong; `param` names the offending parameter (OpenAI's `param`).
    InvalidRequest {
        /// `file`, `purpose`, `expires_after`, `limit`, `after`, `range`, `part_ids`, ...
        param: Option<String>,
    },
    /// No such file or upload (or it expired).
    NotFound,
    /// The body (or declared size) is over a limit.
    TooLarge,
    /// The object is not in a state that allows this (a completed or cancelled upload).
    Conflict,
    /// The object store or the database is down, unreachable or locked: retry later.
    Unavailable,
    /// A bug or a broken configuration/deployment.
    Internal,
}

/// Everything that can go wrong in the Files and Uploads APIs.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    // ---- requests ----
    /// The filename is not acceptable.
    #[error("filename {shown} is refused: {problem}; send a plain file name without path separators or control characters", shown = crate::names::display_name(name))]
    BadFilename {
        /// Parameter that carried it (`file` or `filename`).
        param: &'static str,
        /// The name as given (escaped when shown).
        name: String,
        /// Why.
        problem: FilenameProblem,
    },
    /// The purpose is not one of OpenAI's.
    #[error("purpose {value:?} is not known: use one of assistants, assistants_output, batch, batch_output, fine-tune, fine-tune-results, vision, user_data, evals")]
    UnknownPurpose {
        /// The value given.
        value: String,
    },
    /// `expires_after.anchor` is not `created_at`.
    #[error("expires_after.anchor {anchor:?} is not supported: use \"created_at\"")]
    BadExpiresAnchor {
        /// The value given.
        anchor: String,
    },
    /// `expires_after.seconds` is out of range.
    #[error(
        "expires_after.seconds {seconds} is out of range: use 3600 (one hour) to 2592000 (30 days)"
    )]
    BadExpiresSeconds {
        /// The value given.
        seconds: i64,
    },
    /// `limit` is out of range.
    #[error("limit {limit} is out of range: use 1 to 10000")]
    BadLimit {
        /// The value given.
        limit: i64,
    },
    /// `order` is neither `asc` nor `desc`.
    #[error("order {value:?} is not known: use \"asc\" or \"desc\"")]
    BadOrder {
        /// The value given.
        value: String,
    },
    /// `after` is not a file id of this service.
    #[error("after {shown} is not a file id: pass the last_id of the previous page", shown = crate::names::display_name(after))]
    BadCursor {
        /// The value given.
        after: String,
    },
    /// The byte range cannot be served.
    #[error("range {start}-{end} cannot be satisfied for a file of {size} bytes: ask for bytes within 0-{last}",
        end = end.map(|e| e.to_string()).unwrap_or_default(), last = size.saturating_sub(1))]
    BadRange {
        /// First byte asked for.
        start: u64,
        /// Last byte asked for (inclusive), if given.
        end: Option<u64>,
        /// Size of the file.
        size: u64,
    },
    /// Reading the request body failed (client disconnected); nothing was stored.
    #[error("reading the {param} body failed after {received} bytes, nothing was stored: send the request again")]
    BodyRead {
        /// `file` or `data`.
        param: &'static str,
        /// Bytes received before the failure.
        received: u64,
        /// The body's error.
        #[source]
        source: std::io::Error,
    },
    /// The body, or the declared size, is over the limit.
    #[error("{what} is over the limit of {limit} bytes{got}: send a smaller one{hint}",
        got = got.map(|g| format!(" ({g} bytes)")).unwrap_or_default(),
        hint = if *what == "file" { ", or use the Uploads API for large files" } else { "" })]
    TooLarge {
        /// `file`, `upload`, `part`.
        what: &'static str,
        /// The limit in bytes.
        limit: u64,
        /// Bytes seen or declared, when known (a streamed body stops counting at the limit).
        got: Option<u64>,
    },
    /// An upload's declared size is not positive.
    #[error("bytes {bytes} is not a valid upload size: declare the exact size of the file, at least 1 byte")]
    BadUploadBytes {
        /// The value given.
        bytes: i64,
    },
    /// The MIME type is empty, too long or has control characters.
    #[error("mime_type {shown} is not valid: send a MIME type such as text/jsonl", shown = crate::names::display_name(value))]
    BadMimeType {
        /// The value given.
        value: String,
    },
    /// `complete_upload` was given no part ids.
    #[error("part_ids is empty: list the ids of the parts in file order")]
    NoParts,
    /// A part id is not a part of this upload.
    #[error("part {shown} is not a part of upload {upload_id}: list only ids returned by add_part for this upload", shown = crate::names::display_name(part_id))]
    UnknownPart {
        /// Upload.
        upload_id: String,
        /// Offending part id.
        part_id: String,
    },
    /// A part id is listed twice.
    #[error("part {part_id} is listed twice in part_ids: list each part once")]
    DuplicatePart {
        /// Offending part id.
        part_id: String,
    },
    /// Parts must be listed in the order they were added (see the crate docs).
    #[error("part {part_id} is listed before a part that was added earlier: list parts in the order they were added (send parts in file order, one at a time)")]
    PartOrder {
        /// Offending part id.
        part_id: String,
    },
    /// A part other than the last is smaller than S3's minimum.
    #[error("part {part_id} has {size} bytes, but every part except the last needs at least {min} bytes (S3's multipart minimum): send larger parts")]
    PartTooSmall {
        /// Offending part id.
        part_id: String,
        /// Its size.
        size: u64,
        /// The minimum.
        min: u64,
    },
    /// The listed parts do not add up to the declared size.
    #[error("the parts add up to {actual} bytes but the upload declared {declared}: list all parts, or cancel and create the upload with the right size")]
    ByteCountMismatch {
        /// Declared in `create_upload`.
        declared: u64,
        /// Sum of the listed parts.
        actual: u64,
    },
    /// The `md5` given is not 32 hex digits.
    #[error("md5 {shown} is not an MD5 checksum: send 32 hex digits", shown = crate::names::display_name(value))]
    BadMd5 {
        /// The value given.
        value: String,
    },
    /// The assembled file's MD5 differs from the one given; the upload is cancelled.
    #[error("the assembled file's md5 is {actual}, not {expected}: the upload was cancelled and nothing was kept; upload the file again")]
    Md5Mismatch {
        /// Given.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// No such file (or it expired).
    #[error("no file with id {shown}: it does not exist, expired or was deleted; list files to see what exists", shown = crate::names::display_name(id))]
    FileNotFound {
        /// The id asked for.
        id: String,
    },
    /// No such upload (or it expired).
    #[error("no upload with id {shown}: it does not exist or expired (uploads last one hour); create a new upload", shown = crate::names::display_name(id))]
    UploadNotFound {
        /// The id asked for.
        id: String,
    },
    /// The upload is completed or cancelled (or being completed).
    #[error("upload {id} is {status}: {hint}", hint = if *status == "completed" { "its file exists already" } else { "create a new upload" })]
    UploadState {
        /// Upload id.
        id: String,
        /// Its status.
        status: &'static str,
    },

    // ---- configuration ----
    /// The config text is not valid YAML/JSON or does not have the expected shape.
    #[error("the files config is not valid: {source}; see the seed-004 shape (api: files, provider_type: remote::s3, config: {{bucket_name, region, ...}})")]
    ConfigSyntax {
        /// The parser's error.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A `${env.VAR}` without default names an unset variable.
    #[error("the files config needs the environment variable {var} (at {at}), which is not set: set it, or write ${{env.{var}:=default}}")]
    MissingEnv {
        /// The variable.
        var: String,
        /// Where in the config (`config.bucket_name`).
        at: String,
    },
    /// A `${...}` placeholder is malformed.
    #[error("the files config has a malformed placeholder at {at}: write ${{env.VAR}} or ${{env.VAR:=default}}")]
    BadPlaceholder {
        /// Where in the config.
        at: String,
    },
    /// A config value is wrong.
    #[error("the files config value {field} is not valid: {reason}")]
    ConfigValue {
        /// The field (`config.bucket_name`).
        field: &'static str,
        /// What is expected.
        reason: &'static str,
    },

    // ---- storage and database ----
    /// The object store is unreachable, refuses our credentials, or the bucket is missing.
    #[error("the object store is not available ({op}): check that it runs and the bucket and credentials are right, then retry")]
    StoreUnavailable {
        /// What we were doing.
        op: &'static str,
        /// The store's error.
        #[source]
        source: infra_store::Error,
    },
    /// The object store failed otherwise.
    #[error("the object store failed ({op}): see the cause; retry, and report it if it persists")]
    Store {
        /// What we were doing.
        op: &'static str,
        /// The store's error.
        #[source]
        source: infra_store::Error,
    },
    /// The database is unreachable, locked or out of connections.
    #[error("the metadata database is not available ({op}): check that it runs (or that no other process holds the SQLite file locked), then retry")]
    DbUnavailable {
        /// What we were doing.
        op: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// The database failed otherwise.
    #[error("the metadata database failed ({op}): see the cause; report it if it persists")]
    Db {
        /// What we were doing.
        op: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// A row of the database has a value this version does not understand.
    #[error("the metadata database has an unexpected value in {column} ({value:?}): the database was written by another version or edited by hand")]
    BadRow {
        /// The column.
        column: &'static str,
        /// The value.
        value: String,
    },
    /// A local file (the SQLite database's directory, a spool file) could not be used.
    #[error("cannot use {}: check the directory's permissions and free space", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
}

impl FilesError {
    /// The kind of failure, for the HTTP mapping.
    pub fn kind(&self) -> ErrorKind {
        let invalid = |p: &str| ErrorKind::InvalidRequest {
            param: Some(p.to_string()),
        };
        match self {
            Self::BadFilename { param, .. } => invalid(param),
            Self::UnknownPurpose { .. } => invalid("purpose"),
            Self::BadExpiresAnchor { .. } => invalid("expires_after[anchor]"),
            Self::BadExpiresSeconds { .. } => invalid("expires_after[seconds]"),
            Self::BadLimit { .. } => invalid("limit"),
            Self::BadOrder { .. } => invalid("order"),
            Self::BadCursor { .. } => invalid("after"),
            Self::BadRange { .. } => invalid("range"),
            Self::BodyRead { param, .. } => invalid(param),
            Self::TooLarge { .. } => ErrorKind::TooLarge,
            Self::BadUploadBytes { .. } => invalid("bytes"),
            Self::BadMimeType { .. } => invalid("mime_type"),
            Self::NoParts
            | Self::UnknownPart { .. }
            | Self::DuplicatePart { .. }
            | Self::PartOrder { .. }
            | Self::PartTooSmall { .. } => invalid("part_ids"),
            Self::ByteCountMismatch { .. } => invalid("bytes"),
            Self::BadMd5 { .. } | Self::Md5Mismatch { .. } => invalid("md5"),
            Self::FileNotFound { .. } | Self::UploadNotFound { .. } => ErrorKind::NotFound,
            Self::UploadState { .. } => ErrorKind::Conflict,
            Self::ConfigSyntax { .. }
            | Self::MissingEnv { .. }
            | Self::BadPlaceholder { .. }
            | Self::ConfigValue { .. } => ErrorKind::Internal,
            Self::StoreUnavailable { .. } | Self::DbUnavailable { .. } => ErrorKind::Unavailable,
            Self::Store { .. } | Self::Db { .. } | Self::BadRow { .. } | Self::Io { .. } => {
                ErrorKind::Internal
            }
        }
    }

    /// Wraps a store error, classifying availability problems.
    pub(crate) fn store(op: &'static str, source: infra_store::Error) -> Self {
        use infra_store::Error as E;
        let unavailable = matches!(
            source,
            E::NoCredentials { .. }
                | E::BadCredentials { .. }
                | E::AccessDenied { .. }
                | E::NoSuchBucket { .. }
                | E::WrongRegion { .. }
                | E::Unreachable { .. }
        );
        if unavailable {
            Self::StoreUnavailable { op, source }
        } else {
            Self::Store { op, source }
        }
    }

    /// Wraps a database error, classifying availability problems (connection, pool, SQLite
    /// busy/locked).
    pub(crate) fn db(op: &'static str, source: sqlx::Error) -> Self {
        let unavailable = match &source {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(d) => {
                // SQLite SQLITE_BUSY (5) / SQLITE_LOCKED (6) with extended codes; PostgreSQL
                // class 08 (connection), 53 (resources), 57P0x (shutdown).
                let code = d.code().map(|c| c.into_owned()).unwrap_or_default();
                let sqlite_busy = code
                    .parse::<i64>()
                    .map(|c| matches!(c & 0xff, 5 | 6))
                    .unwrap_or(false);
                sqlite_busy
                    || code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57P")
            }
            _ => false,
        };
        if unavailable {
            Self::DbUnavailable { op, source }
        } else {
            Self::Db { op, source }
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

impl ErrorKind {
    /// The workspace-wide kind (the HTTP API uses [`ErrorKind`] itself for OpenAI's `param`).
    pub fn general(&self) -> infra_config::ErrorKind {
        use infra_config::ErrorKind as K;
        match self {
            Self::InvalidRequest { .. } => K::Usage,
            Self::NotFound => K::NotFound,
            Self::TooLarge => K::TooLarge,
            Self::Conflict => K::Conflict,
            Self::Unavailable => K::Unavailable,
            Self::Internal => K::Failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_classification() {
        let unreachable = infra_store::Error::Unreachable {
            endpoint: "http://127.0.0.1:1".into(),
            source: std::io::Error::other("refused").into(),
        };
        assert_eq!(
            FilesError::store("PutObject", unreachable).kind(),
            ErrorKind::Unavailable
        );
        let missing = infra_store::Error::NoSuchBucket { bucket: "b".into() };
        assert_eq!(
            FilesError::store("PutObject", missing).kind(),
            ErrorKind::Unavailable
        );
        let gone = infra_store::Error::NoSuchKey {
            target: "s3://b/k".into(),
            version: None,
        };
        assert_eq!(
            FilesError::store("GetObject", gone).kind(),
            ErrorKind::Internal
        );
        assert_eq!(
            FilesError::db("list", sqlx::Error::PoolTimedOut).kind(),
            ErrorKind::Unavailable
        );
        assert_eq!(
            FilesError::db("list", sqlx::Error::RowNotFound).kind(),
            ErrorKind::Internal
        );
        assert_eq!(
            FilesError::FileNotFound {
                id: "file-x".into()
            }
            .kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            FilesError::UploadState {
                id: "upload_x".into(),
                status: "completed"
            }
            .kind(),
            ErrorKind::Conflict
        );
        assert_eq!(
            FilesError::TooLarge {
                what: "file",
                limit: 1,
                got: None
            }
            .kind(),
            ErrorKind::TooLarge
        );
        assert_eq!(
            FilesError::UnknownPurpose { value: "x".into() }.kind(),
            ErrorKind::InvalidRequest {
                param: Some("purpose".into())
            }
        );
    }

    #[test]
    fn messages_are_one_line_and_escape_untrusted_values() {
        let e = FilesError::BadFilename {
            param: "file",
            name: "a\nb\u{1b}[2J".into(),
            problem: FilenameProblem::Control,
        };
        let hostile = FilesError::FileNotFound {
            id: "file-\nInjected: yes".into(),
        };
        for e in [e, hostile] {
            let m = e.to_string();
            assert!(!m.contains('\n') && !m.contains('\u{1b}'), "{m}");
        }
    }
}
