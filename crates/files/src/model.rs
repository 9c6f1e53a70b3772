//! Request and response types, serialized exactly as OpenAI's JSON.

use std::pin::Pin;
use std::str::FromStr;

use bytes::Bytes;
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::error::{FilesError, Result};

/// Shortest `expires_after.seconds` OpenAI accepts (one hour).
pub const MIN_EXPIRES_SECONDS: i64 = 3600;
/// Longest `expires_after.seconds` OpenAI accepts (30 days).
pub const MAX_EXPIRES_SECONDS: i64 = 2_592_000;
/// Default and largest `limit` of a list.
pub const MAX_LIST_LIMIT: i64 = 10_000;
/// How long an upload may stay pending (OpenAI: one hour).
pub const UPLOAD_TTL_SECONDS: i64 = 3600;
/// Default expiry of `batch` files (OpenAI: 30 days).
pub const BATCH_DEFAULT_EXPIRY: i64 = MAX_EXPIRES_SECONDS;

/// What a file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Purpose {
    /// `assistants`
    #[serde(rename = "assistants")]
    Assistants,
    /// `assistants_output`
    #[serde(rename = "assistants_output")]
    AssistantsOutput,
    /// `batch`
    #[serde(rename = "batch")]
    Batch,
    /// `batch_output`
    #[serde(rename = "batch_output")]
    BatchOutput,
    /// `fine-tune`
    #[serde(rename = "fine-tune")]
    FineTune,
    /// `fine-tune-results`
    #[serde(rename = "fine-tune-results")]
    FineTuneResults,
    /// `vision`
    #[serde(rename = "vision")]
    Vision,
    /// `user_data`
    #[serde(rename = "user_data")]
    UserData,
    /// `evals`
    #[serde(rename = "evals")]
    Evals,
}

impl Purpose {
    /// All purposes.
    pub const ALL: [Purpose; 9] = [
        Self::Assistants,
        Self::AssistantsOutput,
        Self::Batch,
        Self::BatchOutput,
        Self::FineTune,
        Self::FineTuneResults,
        Self::Vision,
        Self::UserData,
        Self::Evals,
    ];

    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Assistants => "assistants",
            Self::AssistantsOutput => "assistants_output",
            Self::Batch => "batch",
            Self::BatchOutput => "batch_output",
            Self::FineTune => "fine-tune",
            Self::FineTuneResults => "fine-tune-results",
            Self::Vision => "vision",
            Self::UserData => "user_data",
            Self::Evals => "evals",
        }
    }
}

impl FromStr for Purpose {
    type Err = FilesError;
    /// Parses the wire name; anything else is [`FilesError::UnknownPurpose`] (param `purpose`).
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| FilesError::UnknownPurpose { value: s.into() })
    }
}

impl std::fmt::Display for Purpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `expires_after` of a file or upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExpiresAfter {
    /// Only `created_at`.
    pub anchor: String,
    /// 3600..=2592000.
    pub seconds: i64,
}

impl ExpiresAfter {
    /// Validates as OpenAI does.
    pub fn validate(&self) -> Result<()> {
        if self.anchor != "created_at" {
            return Err(FilesError::BadExpiresAnchor {
                anchor: self.anchor.clone(),
            });
        }
        if !(MIN_EXPIRES_SECONDS..=MAX_EXPIRES_SECONDS).contains(&self.seconds) {
            return Err(FilesError::BadExpiresSeconds {
                seconds: self.seconds,
            });
        }
        Ok(())
    }
}

/// What `create` needs besides the body.
#[derive(Debug, Clone)]
pub struct NewFile {
    /// Untrusted filename from the multipart `file` part.
    pub filename: String,
    /// Purpose.
    pub purpose: Purpose,
    /// Optional expiry; `batch` files default to 30 days, others never expire.
    pub expires_after: Option<ExpiresAfter>,
}

/// A file, as OpenAI serializes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileObject {
    /// `file-…`.
    pub id: String,
    /// Always `file`.
    pub object: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, or null for no expiry.
    pub expires_at: Option<i64>,
    /// The filename given at upload.
    pub filename: String,
    /// Purpose.
    pub purpose: Purpose,
    /// Always `processed` (deprecated by OpenAI, still sent).
    pub status: String,
    /// Always null (deprecated by OpenAI, still sent).
    pub status_details: Option<String>,
    /// Hex sha256 of the content. Not an OpenAI field, so not serialized (the JSON stays
    /// exactly OpenAI's); the server may send it as a header (`ETag`, a digest header).
    #[serde(skip_serializing, default)]
    pub sha256: Option<String>,
}

/// Sort order of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Oldest first.
    Asc,
    /// Newest first (OpenAI's default).
    #[default]
    Desc,
}

impl FromStr for Order {
    type Err = FilesError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "asc" => Ok(Self::Asc),
            "desc" => Ok(Self::Desc),
            _ => Err(FilesError::BadOrder { value: s.into() }),
        }
    }
}

/// Query of `GET /v1/files`.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Cursor: the last id of the previous page.
    pub after: Option<String>,
    /// 1..=10000; `None` = 10000.
    pub limit: Option<i64>,
    /// By `(created_at, id)`.
    pub order: Order,
    /// Only files with this purpose.
    pub purpose: Option<Purpose>,
}

/// A page of files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileList {
    /// Always `list`.
    pub object: String,
    /// The files.
    pub data: Vec<FileObject>,
    /// More files follow.
    pub has_more: bool,
    /// Id of the first file of the page (null when empty).
    pub first_id: Option<String>,
    /// Id of the last file of the page: the next `after` (null when empty).
    pub last_id: Option<String>,
}

/// Answer to a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeletedFile {
    /// The id.
    pub id: String,
    /// Always `file`.
    pub object: String,
    /// Always true.
    pub deleted: bool,
}

/// An HTTP-style byte range: first byte and optional last byte (inclusive), or a suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=start-` or `bytes=start-end` (end inclusive).
    From {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: Option<u64>,
    },
    /// `bytes=-n`: the last `n` bytes.
    Suffix(u64),
}

impl ByteRange {
    /// `start-end` as `(start, Some(end))`.
    pub fn new(start: u64, end: Option<u64>) -> Self {
        Self::From { start, end }
    }

    /// The half-open byte range served for a file of `size` bytes, as RFC 9110 says: an end
    /// past the file is cut to the last byte; a start at or past the end is unsatisfiable
    /// ([`FilesError::BadRange`], param `range`), as is an end before the start.
    pub fn resolve(&self, size: u64) -> Result<std::ops::Range<u64>> {
        match *self {
            Self::From { start, end } => {
                let bad = || FilesError::BadRange { start, end, size };
                if start >= size || end.is_some_and(|e| e < start) {
                    return Err(bad());
                }
                let last = end.unwrap_or(u64::MAX).min(size - 1);
                Ok(start..last + 1)
            }
            Self::Suffix(n) => {
                if n == 0 || size == 0 {
                    return Err(FilesError::BadRange {
                        start: size.saturating_sub(n),
                        end: None,
                        size,
                    });
                }
                Ok(size.saturating_sub(n)..size)
            }
        }
    }
}

/// A stream of content bytes.
pub type ContentStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Answer to `content`: the file, the bytes and what part of it they are.
pub struct Content {
    /// The file.
    pub file: FileObject,
    /// The served range (half-open); the whole file when no range was asked for.
    pub range: std::ops::Range<u64>,
    /// True when a range was asked for (HTTP 206 with `Content-Range`).
    pub partial: bool,
    /// The bytes, in order. A store failure mid-way ends it with an `io::Error`.
    pub body: ContentStream,
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Content")
            .field("file", &self.file)
            .field("range", &self.range)
            .field("partial", &self.partial)
            .finish_non_exhaustive()
    }
}

/// What `create_upload` needs.
#[derive(Debug, Clone)]
pub struct NewUpload {
    /// Untrusted filename.
    pub filename: String,
    /// Purpose of the resulting file.
    pub purpose: Purpose,
    /// Exact size of the whole file.
    pub bytes: i64,
    /// MIME type of the file (recorded, checked for shape only).
    pub mime_type: String,
    /// Expiry of the resulting file.
    pub expires_after: Option<ExpiresAfter>,
}

/// Status of an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum UploadStatus {
    /// Parts may be added.
    Pending,
    /// The file exists.
    Completed,
    /// Cancelled; nothing kept.
    Cancelled,
    /// Not completed within an hour; nothing kept.
    Expired,
}

impl UploadStatus {
    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }
}

/// An upload, as OpenAI serializes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UploadObject {
    /// `upload_…`.
    pub id: String,
    /// Always `upload`.
    pub object: String,
    /// Declared size.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds: one hour after creation.
    pub expires_at: i64,
    /// Filename of the resulting file.
    pub filename: String,
    /// Purpose of the resulting file.
    pub purpose: Purpose,
    /// Status.
    pub status: UploadStatus,
    /// The file, once completed.
    pub file: Option<FileObject>,
}

/// A part of an upload, as OpenAI serializes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UploadPart {
    /// `part_…`.
    pub id: String,
    /// Always `upload.part`.
    pub object: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The upload.
    pub upload_id: String,
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Expired files removed (row and object).
    pub expired_files: u64,
    /// Objects without a row, older than the grace period, deleted.
    pub orphan_objects: u64,
    /// Rows whose object was gone, removed.
    pub orphan_rows: u64,
    /// Pending uploads past their hour: multipart aborted, marked expired.
    pub expired_uploads: u64,
    /// Keys under `files/` that are not ours (not a file id); left alone.
    pub foreign_keys: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_math() {
        let r = |s, e| ByteRange::new(s, e).resolve(100);
        assert_eq!(r(0, None).unwrap(), 0..100);
        assert_eq!(r(0, Some(0)).unwrap(), 0..1);
        assert_eq!(r(10, Some(19)).unwrap(), 10..20);
        assert_eq!(r(99, None).unwrap(), 99..100);
        assert_eq!(r(50, Some(1000)).unwrap(), 50..100);
        assert!(r(100, None).is_err());
        assert!(r(20, Some(10)).is_err());
        assert_eq!(ByteRange::Suffix(10).resolve(100).unwrap(), 90..100);
        assert_eq!(ByteRange::Suffix(1000).resolve(100).unwrap(), 0..100);
        assert!(ByteRange::Suffix(0).resolve(100).is_err());
        assert!(ByteRange::new(0, None).resolve(0).is_err());
        let e = r(100, None).unwrap_err();
        assert_eq!(
            e.kind(),
            crate::ErrorKind::InvalidRequest {
                param: Some("range".into())
            }
        );
    }

    #[test]
    fn purposes_round_trip() {
        for p in Purpose::ALL {
            assert_eq!(p.as_str().parse::<Purpose>().unwrap(), p);
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
        let e = "fine_tune".parse::<Purpose>().unwrap_err();
        assert_eq!(
            e.kind(),
            crate::ErrorKind::InvalidRequest {
                param: Some("purpose".into())
            }
        );
    }

    #[test]
    fn expires_after_bounds() {
        let ea = |a: &str, s| ExpiresAfter {
            anchor: a.into(),
            seconds: s,
        };
        assert!(ea("created_at", 3600).validate().is_ok());
        assert!(ea("created_at", 2_592_000).validate().is_ok());
        assert!(ea("created_at", 3599).validate().is_err());
        assert!(ea("created_at", 2_592_001).validate().is_err());
        assert!(ea("last_active_at", 3600).validate().is_err());
    }

    #[test]
    fn json_shapes() {
        let f = FileObject {
            id: "file-1".into(),
            object: "file".into(),
            bytes: 3,
            created_at: 10,
            expires_at: None,
            filename: "a.jsonl".into(),
            purpose: Purpose::FineTune,
            status: "processed".into(),
            status_details: None,
            sha256: Some("ab".repeat(32)),
        };
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            serde_json::json!({"id":"file-1","object":"file","bytes":3,"created_at":10,
                "expires_at":null,"filename":"a.jsonl","purpose":"fine-tune","status":"processed",
                "status_details":null})
        );
        let d = DeletedFile {
            id: "file-1".into(),
            object: "file".into(),
            deleted: true,
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({"id":"file-1","object":"file","deleted":true})
        );
        let u = UploadObject {
            id: "upload_1".into(),
            object: "upload".into(),
            bytes: 3,
            created_at: 1,
            expires_at: 3601,
            filename: "a".into(),
            purpose: Purpose::Batch,
            status: UploadStatus::Pending,
            file: None,
        };
        assert_eq!(
            serde_json::to_value(&u).unwrap(),
            serde_json::json!({"id":"upload_1","object":"upload","bytes":3,"created_at":1,
                "expires_at":3601,"filename":"a","purpose":"batch","status":"pending","file":null})
        );
    }
}
