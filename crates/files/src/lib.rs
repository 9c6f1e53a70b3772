//! The core of an OpenAI-compatible Files API and Uploads API: file bytes in the object store
//! (`infra-store`: an S3 bucket such as Garage, or the local-directory store), metadata in SQL
//! (SQLite by default, PostgreSQL for several servers), no HTTP (the server crate maps
//! [`FilesError::kind`] to statuses once).
//!
//! It replaces Llama Stack's `remote::s3` files provider (seed 004) and reads its config
//! ([`FilesConfig::from_yaml`]), without its limitations: expiry is per file
//! (`expires_after`), objects can be encrypted (`sse`), session tokens and a `key_prefix` are
//! accepted, and large files go up in parts (multipart), streamed, never whole in memory.
//!
//! # Keys
//! The object of file `file-…` is `<key_prefix>files/<id>`. Keys come from ids only, never
//! from the untrusted filename ([`check_filename`] refuses separators, `..`, NUL and control
//! characters anyway, since the name ends up in a `Content-Disposition` header). The sweeper
//! reads keys back from the bucket and acts only on those that pass `infra_store::check_key`
//! and are `files/<well-formed file id>`.
//!
//! # Writing a file ([`Files::create`])
//! The body is streamed: chunks are hashed (sha256) and buffered up to one part. A body smaller
//! than 8 MiB goes up in one `put`; a larger one as a multipart upload of 8 MiB parts (16 MiB
//! when `max_file_size` needs it to stay under 10000 parts), with two parts being sent while the
//! next is read from the client (so at most three parts in memory).
//! `max_file_size` is enforced while reading. Write order: **object first, then the metadata
//! row**; a failure before the row exists (a body that errors, i.e. the client went away; the
//! size limit; a store error) aborts the multipart upload, and a failure of the row insert
//! deletes the object, so a file is listed only when its bytes are complete, and a failed
//! create leaves nothing. A crash between the two leaves an orphan object, which the sweeper
//! removes after the grace period.
//!
//! # Uploads ([`Files::create_upload`] ...)
//! An upload is one S3 multipart upload to the key of the file it will become (the file id is
//! allocated with the upload; the file's `created_at` is the upload's). Each `add_part` body
//! (up to 64 MiB, spooled to a temp file) becomes exactly one S3 part, with a part number
//! allocated atomically in SQL (`next_part`), and is recorded with its own `part_…` id.
//! **Part order:** S3 assembles parts in ascending part-number order, and part numbers are
//! handed out in the order `add_part` calls arrive. `complete_upload` therefore requires the
//! `part_ids` to be listed in the order the parts were added (ascending part numbers; parts may
//! be left out, and are then discarded) and refuses anything else with
//! [`FilesError::PartOrder`] rather than assembling a file in an order the client did not ask
//! for. Clients that upload parts in parallel must add them in file order or re-upload. The
//! listed parts must add up to the declared `bytes`, and every part but the last must have at
//! least 5 MiB (S3's minimum, checked here so both backends behave alike). After S3 completes
//! the object is read back once to compute its sha256 and, when `md5` was given, to verify it
//! (a mismatch deletes the object and cancels the upload). Uploads expire one hour after
//! creation.
//!
//! # SQL schema (`migrations/0001_files.sql`, embedded, same for SQLite and PostgreSQL)
//! - `files(id PK, filename, purpose, bytes, created_at, expires_at NULL, sha256 NULL,
//!   object_key)`, indexes on `(created_at, id)`, `(purpose, created_at, id)`, `expires_at`.
//! - `uploads(id PK, filename, purpose, bytes, mime_type, created_at, expires_at,
//!   file_expires_after NULL, status, file_id, object_key, multipart_id, next_part)`; status is
//!   `pending`, `completing` (shown as pending), `completed`, `cancelled` or `expired`.
//! - `upload_parts(id PK, upload_id, number, etag, bytes, created_at)`.
//! - `infra_files_migrations(version PK, description, applied_at)`: own table, so it does not
//!   collide with other sqlx migrations in a shared database; PostgreSQL migrates under an
//!   advisory lock. SQLite runs in WAL mode with a 5 s busy timeout.
//!
//! # Listing
//! Keyset pagination on `(created_at, id)` in the requested order, never `OFFSET`, so pages stay
//! exact while files are added or removed: a file id carries its `created_at` (see [`ids`]), so
//! `after=<id>` is a position even when that file was deleted meanwhile. `limit` is 1..=10000
//! (default 10000); one extra row tells `has_more`.
//!
//! # Expiry and the sweeper
//! `expires_after {anchor: created_at, seconds: 3600..=2592000}`; `batch` files default to 30
//! days, others never expire. An expired file is never listed or served (NotFound), even before
//! the sweeper removes it. [`Files::sweep`] removes expired files (row, then object), aborts
//! uploads pending past their hour, deletes objects under `files/` that have no row and are
//! older than the grace period (a create in flight is younger), and deletes rows whose object
//! is gone (confirmed with a HEAD). It holds the ids of all rows and the listing of `files/`
//! in memory (tens of bytes per file): fine for millions of files, not for billions.

mod config;
mod db;
mod error;
pub mod ids;
mod model;
mod names;
mod stream;
mod sweep;
mod uploads;

#[cfg(feature = "testing")]
pub mod testing;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use infra_store::{GetOptions, LocalStore, ObjectStore, S3Settings, S3Store};

pub use config::{
    FilesConfig, MetadataStore, ProviderConfig, ProviderType, Secret, SseConfig, SseType,
    DEFAULT_MAX_FILE_SIZE, DEFAULT_MAX_UPLOAD_SIZE,
};
pub use error::{ErrorKind, FilesError, Result};
pub use model::{
    ByteRange, Content, ContentStream, DeletedFile, ExpiresAfter, FileList, FileObject, ListQuery,
    NewFile, NewUpload, Order, Purpose, SweepReport, UploadObject, UploadPart, UploadStatus,
    BATCH_DEFAULT_EXPIRY, MAX_EXPIRES_SECONDS, MAX_LIST_LIMIT, MIN_EXPIRES_SECONDS,
    UPLOAD_TTL_SECONDS,
};
pub use names::{check_filename, FilenameProblem, MAX_FILENAME};
pub use stream::{MAX_UPLOAD_PART, S3_MIN_PART, SINGLE_PUT_THRESHOLD};

use db::{Db, FileRow};

/// Unix seconds now.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The key of a file's object, relative to the store's prefix (`key_prefix`).
pub(crate) fn object_key(id: &str) -> String {
    format!("files/{id}")
}

/// The Files and Uploads APIs over one store and one database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Files {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn ObjectStore>,
    db: Db,
    max_file_size: u64,
    max_upload_size: u64,
    part_size: u64,
    spool_dir: PathBuf,
    /// Seconds added to the wall clock (tests of expiry).
    clock_offset: AtomicI64,
}

impl Files {
    /// Opens the store and the database, runs the migrations and, when `auto_create_bucket`,
    /// creates the bucket.
    pub async fn open(cfg: &FilesConfig, paths: &infra_config::Paths) -> Result<Files> {
        cfg.validate()?;
        let c = &cfg.config;
        let store: Arc<dyn ObjectStore> = match cfg.provider_type {
            ProviderType::RemoteS3 => {
                let mut s =
                    S3Settings::new(c.bucket_name.clone().unwrap_or_default(), cfg.key_prefix());
                s.region = Some(
                    c.region
                        .clone()
                        .unwrap_or_else(|| infra_store::DEFAULT_REGION.to_string()),
                );
                s.endpoint = c.endpoint_url.clone();
                if let (Some(id), Some(secret)) = (&c.aws_access_key_id, &c.aws_secret_access_key) {
                    s.static_credentials = Some((
                        id.0.clone(),
                        secret.0.clone(),
                        c.aws_session_token.as_ref().map(|t| t.0.clone()),
                    ));
                }
                s.sse = c.sse.as_ref().map(|sse| match sse.kind {
                    SseType::Aes256 => infra_store::Sse::Aes256,
                    SseType::AwsKms => infra_store::Sse::Kms {
                        key_id: sse.kms_key_id.clone(),
                    },
                });
                let store = S3Store::connect(&s)
                    .await
                    .map_err(|e| FilesError::store("connect", e))?;
                if c.auto_create_bucket {
                    store
                        .init(&infra_store::InitOptions {
                            versioning: false,
                            noncurrent_days: None,
                            abort_incomplete_days: None,
                            encryption: false,
                        })
                        .await
                        .map_err(|e| FilesError::store("CreateBucket", e))?;
                }
                Arc::new(store)
            }
            ProviderType::InlineLocalfs => Arc::new(LocalStore::new(
                c.storage_dir
                    .clone()
                    .unwrap_or_else(|| paths.home.join("store")),
                &cfg.key_prefix(),
            )),
        };
        let db = Db::open(&c.metadata_store).await?;
        Ok(Self::from_parts(
            store,
            db,
            cfg.max_file_size(),
            cfg.max_upload_size(),
            paths.cache.join("files-spool"),
        ))
    }

    /// Like [`Files::open`] but over a given store (tests: a failure-injecting wrapper).
    #[cfg(feature = "testing")]
    pub async fn open_with_store(
        cfg: &FilesConfig,
        paths: &infra_config::Paths,
        store: Arc<dyn ObjectStore>,
    ) -> Result<Files> {
        cfg.validate()?;
        let db = Db::open(&cfg.config.metadata_store).await?;
        Ok(Self::from_parts(
            store,
            db,
            cfg.max_file_size(),
            cfg.max_upload_size(),
            paths.cache.join("files-spool"),
        ))
    }

    fn from_parts(
        store: Arc<dyn ObjectStore>,
        db: Db,
        max_file_size: u64,
        max_upload_size: u64,
        spool_dir: PathBuf,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                db,
                max_file_size,
                max_upload_size,
                part_size: stream::part_size_for(max_file_size),
                spool_dir,
                clock_offset: AtomicI64::new(0),
            }),
        }
    }

    /// Largest file `create` accepts, bytes.
    pub fn max_file_size(&self) -> u64 {
        self.inner.max_file_size
    }

    /// Largest upload of the Uploads API, bytes.
    pub fn max_upload_size(&self) -> u64 {
        self.inner.max_upload_size
    }

    /// The object store (for diagnostics and tests).
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.inner.store.clone()
    }

    /// Moves this instance's clock forward (tests of expiry).
    #[cfg(feature = "testing")]
    pub fn advance_clock(&self, seconds: i64) {
        self.inner.clock_offset.fetch_add(seconds, Ordering::SeqCst);
    }

    pub(crate) fn now(&self) -> i64 {
        now() + self.inner.clock_offset.load(Ordering::SeqCst)
    }

    /// Stores a new file from a streamed body (see the crate docs for the write order).
    #[tracing::instrument(skip_all, fields(purpose = %req.purpose))]
    pub async fn create(
        &self,
        req: NewFile,
        body: impl Stream<Item = std::result::Result<Bytes, std::io::Error>> + Send + Unpin,
    ) -> Result<FileObject> {
        check_filename(&req.filename).map_err(|problem| FilesError::BadFilename {
            param: "file",
            name: req.filename.clone(),
            problem,
        })?;
        if let Some(ea) = &req.expires_after {
            ea.validate()?;
        }
        let created_at = self.now();
        let id = ids::new_file_id(created_at);
        let key = object_key(&id);
        let w = stream::write_object(
            &self.inner.store,
            &key,
            body,
            self.inner.max_file_size,
            self.inner.part_size,
        )
        .await?;
        let row = FileRow {
            id: id.clone(),
            filename: req.filename,
            purpose: req.purpose,
            bytes: w.size as i64,
            created_at,
            expires_at: expires_at(created_at, req.purpose, req.expires_after.as_ref()),
            sha256: Some(w.sha256),
            object_key: key.clone(),
        };
        if let Err(e) = self.inner.db.insert_file(&row).await {
            self.delete_object(&key).await;
            return Err(e);
        }
        tracing::info!(id, bytes = w.size, "file created");
        Ok(row.to_object())
    }

    /// One page of unexpired files.
    #[tracing::instrument(skip_all)]
    pub async fn list(&self, q: &ListQuery) -> Result<FileList> {
        let limit = q.limit.unwrap_or(MAX_LIST_LIMIT);
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(FilesError::BadLimit { limit });
        }
        let cursor = match &q.after {
            Some(a) => Some((
                ids::file_id_created_at(a)
                    .ok_or_else(|| FilesError::BadCursor { after: a.clone() })?,
                a.as_str(),
            )),
            None => None,
        };
        let mut rows = self
            .inner
            .db
            .list_files(cursor, q.order, q.purpose, self.now(), limit + 1)
            .await?;
        let has_more = rows.len() as i64 > limit;
        rows.truncate(limit as usize);
        let data: Vec<FileObject> = rows.iter().map(FileRow::to_object).collect();
        Ok(FileList {
            object: "list".into(),
            first_id: data.first().map(|f| f.id.clone()),
            last_id: data.last().map(|f| f.id.clone()),
            has_more,
            data,
        })
    }

    async fn live_row(&self, id: &str) -> Result<FileRow> {
        let not_found = || FilesError::FileNotFound { id: id.to_string() };
        if !ids::is_file_id(id) {
            return Err(not_found());
        }
        match self.inner.db.get_file(id).await? {
            Some(r) if !r.expired(self.now()) => Ok(r),
            _ => Err(not_found()),
        }
    }

    /// One file (NotFound when unknown or expired).
    #[tracing::instrument(skip_all, fields(id = ?id))]
    pub async fn get(&self, id: &str) -> Result<FileObject> {
        Ok(self.live_row(id).await?.to_object())
    }

    /// Deletes a file: the row first (it disappears at once), then the object (a failure there
    /// leaves an orphan for the sweeper).
    #[tracing::instrument(skip_all, fields(id = ?id))]
    pub async fn delete(&self, id: &str) -> Result<DeletedFile> {
        let row = self.live_row(id).await?;
        if !self.inner.db.delete_file(id).await? {
            return Err(FilesError::FileNotFound { id: id.to_string() });
        }
        self.delete_object(&row.object_key).await;
        Ok(DeletedFile {
            id: id.to_string(),
            object: "file".into(),
            deleted: true,
        })
    }

    /// The content of a file, or a range of it, as a stream.
    #[tracing::instrument(skip_all, fields(id = ?id, ?range))]
    pub async fn content(&self, id: &str, range: Option<ByteRange>) -> Result<Content> {
        let row = self.live_row(id).await?;
        let file = row.to_object();
        let size = file.bytes;
        let (served, partial) = match range {
            Some(r) => (r.resolve(size)?, true),
            None => (0..size, false),
        };
        let opts = GetOptions {
            range: partial.then(|| served.clone()),
            ..Default::default()
        };
        let resp = match self.inner.store.get(&row.object_key, &opts).await {
            Ok(r) => r,
            Err(infra_store::Error::NoSuchKey { .. }) => {
                // The row outlived its object; the sweeper removes the row.
                return Err(FilesError::FileNotFound { id: id.to_string() });
            }
            Err(e) => return Err(FilesError::store("GetObject", e)),
        };
        let body = resp
            .body
            .map_err(|e| std::io::Error::other(FilesError::store("GetObject body", e)))
            .boxed();
        Ok(Content {
            file,
            range: served,
            partial,
            body,
        })
    }

    async fn delete_object(&self, key: &str) {
        if let Err(e) = self.inner.store.delete(key).await {
            tracing::warn!(key, error = %e, "deleting an object failed; the sweeper removes it later");
        }
    }
}

/// When a file created at `created_at` expires: `expires_after` if given, 30 days for `batch`,
/// else never.
pub(crate) fn expires_at(
    created_at: i64,
    purpose: Purpose,
    expires_after: Option<&ExpiresAfter>,
) -> Option<i64> {
    match expires_after {
        Some(ea) => Some(created_at + ea.seconds),
        None if purpose == Purpose::Batch => Some(created_at + BATCH_DEFAULT_EXPIRY),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The HTTP server runs these futures on a multi-threaded runtime (axum handlers must be
    /// `Send`): a compile-time check.
    #[allow(dead_code, clippy::diverging_sub_expression)]
    fn futures_are_send(f: &Files) {
        fn send<T: Send>(_: T) {}
        fn body() -> futures::stream::Empty<std::result::Result<Bytes, std::io::Error>> {
            futures::stream::empty()
        }
        let new = NewFile {
            filename: "a".into(),
            purpose: Purpose::UserData,
            expires_after: None,
        };
        send(f.create(new, body()));
        send(f.list(&ListQuery::default()));
        send(f.get("file-x"));
        send(f.delete("file-x"));
        send(f.content("file-x", None));
        send(f.create_upload(NewUpload {
            filename: "a".into(),
            purpose: Purpose::Batch,
            bytes: 1,
            mime_type: "text/plain".into(),
            expires_after: None,
        }));
        send(f.add_part("upload_x", body()));
        send(f.complete_upload("upload_x", &[], None));
        send(f.cancel_upload("upload_x"));
        send(f.sweep(std::time::Duration::ZERO));
        send(Files::open(
            &FilesConfig::embedded(&infra_config::Paths::under("/x")),
            &infra_config::Paths::under("/x"),
        ));
    }

    #[test]
    fn files_is_clone_send_sync() {
        fn ok<T: Clone + Send + Sync + 'static>() {}
        ok::<Files>();
        fn err<T: std::error::Error + Send + Sync + 'static>() {}
        err::<FilesError>();
    }

    #[test]
    fn part_sizes() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(stream::part_size_for(DEFAULT_MAX_FILE_SIZE), 8 * MIB);
        assert_eq!(stream::part_size_for(1), 8 * MIB);
        // 100 GiB in at most 10000 parts: a little over 10 MiB each.
        let p = stream::part_size_for(100 * 1024 * MIB);
        assert!(p * 10_000 >= 100 * 1024 * MIB && p < 11 * MIB, "{p}");
        assert_eq!(stream::part_size_for(10_000 * 16 * MIB), 16 * MIB);
        assert!(stream::part_size_for(u64::MAX) <= 16 * MIB);
    }

    #[test]
    fn default_expiry() {
        let ea = ExpiresAfter {
            anchor: "created_at".into(),
            seconds: 7200,
        };
        assert_eq!(expires_at(100, Purpose::UserData, None), None);
        assert_eq!(expires_at(100, Purpose::Batch, None), Some(100 + 2_592_000));
        assert_eq!(expires_at(100, Purpose::Batch, Some(&ea)), Some(7300));
        assert_eq!(expires_at(100, Purpose::Vision, Some(&ea)), Some(7300));
    }
}
