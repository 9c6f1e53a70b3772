//! The store interface: one trait ([`ObjectStore`]) at the level of S3's primitives, so the
//! transfer engine (multipart, ranges, resume, sync) is written once for every backend.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::Serialize;

use crate::error::Result;

/// Metadata key holding the hex sha256 of the whole object (`x-amz-meta-sha256` on S3).
pub const META_SHA256: &str = "sha256";
/// Metadata key of compressed objects: sha256 of the uncompressed content.
pub const META_UNCOMPRESSED_SHA256: &str = "uncompressed-sha256";
/// Metadata key of compressed objects: size of the uncompressed content.
pub const META_UNCOMPRESSED_SIZE: &str = "uncompressed-size";

/// User metadata stored with an object (S3 `x-amz-meta-*`, lower-case keys).
pub type Metadata = BTreeMap<String, String>;

/// One object as listed or headed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectInfo {
    /// Key relative to the store's prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time.
    pub last_modified: Option<DateTime<Utc>>,
    /// ETag without quotes (`md5` or `md5-N` for multipart uploads on S3).
    pub etag: Option<String>,
    /// Version id, when the bucket is versioned.
    pub version_id: Option<String>,
    /// User metadata. Listings from S3 do not carry it (empty); `head` does.
    pub metadata: Metadata,
}

impl ObjectInfo {
    /// The sha256 recorded at upload, if any.
    pub fn sha256(&self) -> Option<&str> {
        self.metadata.get(META_SHA256).map(String::as_str)
    }
}

/// One version of an object (`store versions KEY`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// Key relative to the prefix.
    pub key: String,
    /// Version id (`null` for objects written before versioning was enabled).
    pub version_id: String,
    /// The current version.
    pub is_latest: bool,
    /// A delete marker rather than data.
    pub delete_marker: bool,
    /// Size in bytes (0 for delete markers).
    pub size: u64,
    /// When this version was written.
    pub last_modified: Option<DateTime<Utc>>,
    /// ETag without quotes.
    pub etag: Option<String>,
}

/// One page of a listing with a delimiter (`ListObjectsV2` with `delimiter=/`): the objects
/// directly under the prefix and the common prefixes ("subdirectories") below it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    /// Objects whose key has no delimiter after the prefix (keys relative to the store prefix).
    pub objects: Vec<ObjectInfo>,
    /// Common prefixes, each ending in the delimiter (relative to the store prefix).
    pub prefixes: Vec<String>,
    /// Token of the next page; `None` on the last page.
    pub next: Option<String>,
}

/// A part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PartInfo {
    /// 1-based part number.
    pub number: i32,
    /// ETag the server returned for the part.
    pub etag: String,
    /// Part size in bytes.
    pub size: u64,
}

/// What an upload sends.
#[derive(Debug, Clone)]
pub enum Body {
    /// Bytes in memory.
    Bytes(Bytes),
    /// A region of a file, streamed from disk (bounded memory, retryable).
    File {
        /// File to read.
        path: PathBuf,
        /// Start offset.
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
}

impl Body {
    /// Number of bytes this body sends.
    pub fn len(&self) -> u64 {
        match self {
            Self::Bytes(b) => b.len() as u64,
            Self::File { len, .. } => *len,
        }
    }

    /// True when nothing is sent.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A stream of body chunks.
pub type ByteChunks = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

/// The answer to a GET.
pub struct GetResponse {
    /// Object info (size is the whole object's size, not the range's).
    pub info: ObjectInfo,
    /// The requested bytes, in order.
    pub body: ByteChunks,
}

/// Preconditions and selection for a GET.
#[derive(Debug, Clone, Default)]
pub struct GetOptions {
    /// Byte range (end exclusive); the whole object when absent.
    pub range: Option<Range<u64>>,
    /// A specific version.
    pub version_id: Option<String>,
    /// Fail with [`crate::Error::Changed`] unless the object still has this ETag.
    pub if_match: Option<String>,
}

/// The result of writing an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PutResult {
    /// ETag without quotes.
    pub etag: Option<String>,
    /// Version id of the new object, when versioned.
    pub version_id: Option<String>,
}

/// What `store init` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitOptions {
    /// Turn on versioning.
    pub versioning: bool,
    /// Expire noncurrent versions after this many days (lifecycle rule); `None` for no rule.
    pub noncurrent_days: Option<u32>,
    /// Abort incomplete multipart uploads after this many days (same lifecycle rule set).
    pub abort_incomplete_days: Option<u32>,
    /// Default encryption SSE-S3 (AES256).
    pub encryption: bool,
}

/// Outcome of one step of `store init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    /// Done now.
    Done,
    /// It was already so.
    AlreadyDone,
    /// The server does not implement it.
    Unsupported,
    /// Not asked for.
    Skipped,
    /// It failed for another reason.
    Failed,
}

/// One line of the `store init` report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InitStep {
    /// `bucket`, `versioning`, `lifecycle`, `encryption`.
    pub feature: &'static str,
    /// What happened.
    pub status: StepStatus,
    /// Detail: the region, the rule, the server's error code and message.
    pub detail: String,
}

/// Which backend a store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// An S3 (or S3-compatible) bucket.
    S3,
    /// A directory on this host.
    Local,
}

/// A bucket (or local directory) under a prefix. Keys are relative to the prefix.
///
/// Implementations: [`crate::S3Store`] and [`crate::LocalStore`]; both keep the same semantics
/// (metadata, ETags of multipart uploads, ranges, preconditions) so the engine does not care.
#[async_trait::async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// `s3://bucket/prefix/` or `local:/dir/prefix/`, for messages.
    fn describe(&self) -> String;
    /// URL of one key, for messages (`s3://bucket/prefix/key`).
    fn url_of(&self, key: &str) -> String;
    /// Backend kind.
    fn kind(&self) -> BackendKind;

    /// All objects whose key starts with `prefix` (recursive), sorted by key. Part-list sidecars
    /// (`.parts/…`, see [`crate::parts`]) are left out unless `prefix` is within `.parts/`.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>>;
    /// One object's info including metadata.
    async fn head(&self, key: &str, version_id: Option<&str>) -> Result<ObjectInfo>;
    /// Reads an object or a range of it.
    async fn get(&self, key: &str, opts: &GetOptions) -> Result<GetResponse>;
    /// Writes a whole object in one request (up to 5 GiB on S3).
    async fn put(&self, key: &str, body: Body, metadata: &Metadata) -> Result<PutResult>;
    /// Deletes an object (no error when it does not exist).
    async fn delete(&self, key: &str) -> Result<()>;

    /// Starts a multipart upload; returns its id.
    async fn create_multipart(&self, key: &str, metadata: &Metadata) -> Result<String>;
    /// Uploads one part (1-based number).
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Body,
    ) -> Result<PartInfo>;
    /// Parts already uploaded (for resuming); [`crate::Error::NoSuchKey`] when the upload is gone.
    async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<PartInfo>>;
    /// Completes the upload from its parts, in order.
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[PartInfo],
    ) -> Result<PutResult>;
    /// Abandons an upload and frees its parts.
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<()>;

    /// One page of the keys under `prefix` grouped at `delimiter`, from `token` (the previous
    /// page's [`ListPage::next`]); at most `max_keys` entries when given. The default lists
    /// everything under the prefix with [`ObjectStore::list`] and groups it in one page (the
    /// local store); the S3 store sends `ListObjectsV2` with the delimiter.
    async fn list_page(
        &self,
        prefix: &str,
        delimiter: &str,
        token: Option<&str>,
        max_keys: Option<i32>,
    ) -> Result<ListPage> {
        let _ = (token, max_keys);
        let all = self.list(prefix).await?;
        Ok(group_listing(prefix, delimiter, all))
    }

    /// Copies `from` to `to` within the store, server-side where the backend can. With
    /// `metadata`, the copy gets exactly that user metadata (S3 `MetadataDirective: REPLACE`);
    /// without, it keeps the source's. Copying a key onto itself with new metadata is how
    /// metadata changes (S3 has no other way). The default reads the source into a temporary
    /// file and writes it again (the local store).
    async fn copy(&self, from: &str, to: &str, metadata: Option<&Metadata>) -> Result<PutResult> {
        use futures::StreamExt;
        use std::io::Write;
        let resp = self.get(from, &GetOptions::default()).await?;
        let meta = metadata.cloned().unwrap_or(resp.info.metadata.clone());
        let tmp = tempfile::NamedTempFile::new()
            .map_err(|e| crate::Error::io("create", std::env::temp_dir(), e))?;
        let path = tmp.path().to_path_buf();
        let mut file = tmp.as_file();
        let mut body = resp.body;
        let mut len = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            len += chunk.len() as u64;
            file.write_all(&chunk)
                .map_err(|e| crate::Error::io("write", &path, e))?;
        }
        let r = self
            .put(
                to,
                Body::File {
                    path: path.clone(),
                    offset: 0,
                    len,
                },
                &meta,
            )
            .await;
        drop(tmp);
        r
    }

    /// All versions of `key` (newest first).
    async fn versions(&self, key: &str) -> Result<Vec<VersionInfo>>;
    /// Creates the bucket and applies versioning, lifecycle and encryption as far as supported.
    async fn init(&self, opts: &InitOptions) -> Result<Vec<InitStep>>;
}

/// Groups a recursive listing of `prefix` at `delimiter` into one [`ListPage`] (what
/// `ListObjectsV2` with a delimiter answers), for backends without a delimited listing.
pub fn group_listing(prefix: &str, delimiter: &str, all: Vec<ObjectInfo>) -> ListPage {
    let mut page = ListPage::default();
    for o in all {
        let Some(rest) = o.key.strip_prefix(prefix) else {
            continue;
        };
        match (delimiter.is_empty(), rest.find(delimiter)) {
            (false, Some(i)) => {
                let p = format!("{prefix}{}", &rest[..i + delimiter.len()]);
                if page.prefixes.last() != Some(&p) {
                    page.prefixes.push(p);
                }
            }
            _ => page.objects.push(o),
        }
    }
    page.prefixes.dedup();
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(key: &str) -> ObjectInfo {
        ObjectInfo {
            key: key.into(),
            size: 1,
            last_modified: None,
            etag: None,
            version_id: None,
            metadata: Metadata::new(),
        }
    }

    #[test]
    fn grouping_at_the_delimiter() {
        let all = ["a", "d/", "d/x", "d/y/z", "e/f", "top"]
            .into_iter()
            .map(info)
            .collect();
        let p = group_listing("", "/", all);
        let keys: Vec<_> = p.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["a", "top"]);
        assert_eq!(p.prefixes, ["d/", "e/"]);
        let all = ["d/", "d/x", "d/y/z"].into_iter().map(info).collect();
        let p = group_listing("d/", "/", all);
        let keys: Vec<_> = p.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["d/", "d/x"]);
        assert_eq!(p.prefixes, ["d/y/"]);
    }
}
