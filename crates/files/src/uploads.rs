//! The Uploads API on S3 multipart uploads (see the crate docs for part order).

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use infra_store::{Body, GetOptions, Metadata, PartInfo};
use md5::Md5;
use sha2::{Digest, Sha256};

use crate::db::{FileRow, PartRow, UploadRow};
use crate::error::{FilesError, Result};
use crate::model::{NewUpload, UploadObject, UploadPart, UploadStatus, UPLOAD_TTL_SECONDS};
use crate::stream::{self, MAX_UPLOAD_PART, S3_MIN_PART};
use crate::{check_filename, expires_at, ids, object_key, Files};

fn valid_mime(m: &str) -> bool {
    !m.is_empty() && m.len() <= 255 && m.is_ascii() && !m.chars().any(|c| c.is_ascii_control())
}

impl Files {
    /// Starts an upload: records it and opens the multipart upload of the future file.
    #[tracing::instrument(skip_all, fields(bytes = req.bytes))]
    pub async fn create_upload(&self, req: NewUpload) -> Result<UploadObject> {
        check_filename(&req.filename).map_err(|problem| FilesError::BadFilename {
            param: "filename",
            name: req.filename.clone(),
            problem,
        })?;
        if req.bytes <= 0 {
            return Err(FilesError::BadUploadBytes { bytes: req.bytes });
        }
        if req.bytes as u64 > self.inner.max_upload_size {
            return Err(FilesError::TooLarge {
                what: "upload",
                limit: self.inner.max_upload_size,
                got: Some(req.bytes as u64),
            });
        }
        if !valid_mime(&req.mime_type) {
            return Err(FilesError::BadMimeType {
                value: req.mime_type.clone(),
            });
        }
        if let Some(ea) = &req.expires_after {
            ea.validate()?;
        }
        let created_at = self.now();
        let file_id = ids::new_file_id(created_at);
        let key = object_key(&file_id);
        let multipart_id = self
            .inner
            .store
            .create_multipart(&key, &Metadata::new())
            .await
            .map_err(|e| FilesError::store("CreateMultipartUpload", e))?;
        let row = UploadRow {
            id: ids::new_upload_id(),
            filename: req.filename,
            purpose: req.purpose,
            bytes: req.bytes,
            mime_type: req.mime_type,
            created_at,
            expires_at: created_at + UPLOAD_TTL_SECONDS,
            file_expires_after: req.expires_after.as_ref().map(|e| e.seconds),
            status: "pending".into(),
            file_id,
            object_key: key.clone(),
            multipart_id: multipart_id.clone(),
        };
        if let Err(e) = self.inner.db.insert_upload(&row).await {
            let _ = self.inner.store.abort_multipart(&key, &multipart_id).await;
            return Err(e);
        }
        row.to_object(created_at, None)
    }

    /// The upload, refusing unknown and expired ones (NotFound) and those not pending
    /// (Conflict).
    async fn pending_upload(&self, id: &str) -> Result<UploadRow> {
        let not_found = || FilesError::UploadNotFound { id: id.to_string() };
        if !ids::is_upload_id(id) {
            return Err(not_found());
        }
        let row = self.inner.db.get_upload(id).await?.ok_or_else(not_found)?;
        match row.status_at(self.now())? {
            UploadStatus::Pending if row.status == "pending" => Ok(row),
            UploadStatus::Pending => Err(FilesError::UploadState {
                id: id.to_string(),
                status: "being completed",
            }),
            UploadStatus::Expired => Err(not_found()),
            s @ (UploadStatus::Completed | UploadStatus::Cancelled) => {
                Err(FilesError::UploadState {
                    id: id.to_string(),
                    status: s.as_str(),
                })
            }
        }
    }

    /// Adds one part (up to 64 MiB): it becomes exactly one S3 part.
    #[tracing::instrument(skip_all, fields(upload = ?upload_id))]
    pub async fn add_part(
        &self,
        upload_id: &str,
        body: impl Stream<Item = std::result::Result<Bytes, std::io::Error>> + Send + Unpin,
    ) -> Result<UploadPart> {
        let up = self.pending_upload(upload_id).await?;
        let max = MAX_UPLOAD_PART.min(up.bytes as u64);
        let (file, size) = stream::spool(&self.inner.spool_dir, body, max).await?;
        let now = self.now();
        let Some(number) = self.inner.db.next_part_number(upload_id, now).await? else {
            // Completed, cancelled or expired meanwhile: the same answer as up front.
            self.pending_upload(upload_id).await?;
            return Err(FilesError::UploadState {
                id: upload_id.to_string(),
                status: "being completed",
            });
        };
        if number > stream::MAX_PARTS {
            return Err(FilesError::TooLarge {
                what: "number of parts of the upload",
                limit: stream::MAX_PARTS as u64,
                got: Some(number as u64),
            });
        }
        let info = self
            .inner
            .store
            .upload_part(
                &up.object_key,
                &up.multipart_id,
                number as i32,
                Body::File {
                    path: file.path().to_path_buf(),
                    offset: 0,
                    len: size,
                },
            )
            .await
            .map_err(|e| FilesError::store("UploadPart", e))?;
        drop(file);
        let part = PartRow {
            id: ids::new_part_id(),
            number,
            etag: info.etag,
            bytes: size as i64,
        };
        if !self.inner.db.insert_part(upload_id, &part, now).await? {
            return Err(FilesError::UploadState {
                id: upload_id.to_string(),
                status: "no longer pending",
            });
        }
        Ok(UploadPart {
            id: part.id,
            object: "upload.part".into(),
            created_at: now,
            upload_id: upload_id.to_string(),
        })
    }

    /// Completes an upload from `part_ids` (in the order they were added), checks the byte
    /// total and the optional md5, and creates the file.
    #[tracing::instrument(skip_all, fields(upload = ?upload_id, parts = part_ids.len()))]
    pub async fn complete_upload(
        &self,
        upload_id: &str,
        part_ids: &[String],
        md5: Option<&str>,
    ) -> Result<UploadObject> {
        let md5 = match md5.filter(|m| !m.is_empty()) {
            Some(m) if m.len() == 32 && m.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(m.to_ascii_lowercase())
            }
            Some(m) => return Err(FilesError::BadMd5 { value: m.into() }),
            None => None,
        };
        let up = self.pending_upload(upload_id).await?;
        if part_ids.is_empty() {
            return Err(FilesError::NoParts);
        }
        let known: HashMap<String, PartRow> = self
            .inner
            .db
            .parts_of(upload_id)
            .await?
            .into_iter()
            .map(|p| (p.id.clone(), p))
            .collect();
        let mut seen = HashSet::new();
        let mut parts = Vec::with_capacity(part_ids.len());
        let mut total = 0u64;
        for (i, pid) in part_ids.iter().enumerate() {
            let p = known.get(pid).ok_or_else(|| FilesError::UnknownPart {
                upload_id: upload_id.to_string(),
                part_id: pid.clone(),
            })?;
            if !seen.insert(pid.as_str()) {
                return Err(FilesError::DuplicatePart {
                    part_id: pid.clone(),
                });
            }
            if parts
                .last()
                .is_some_and(|q: &PartInfo| q.number as i64 >= p.number)
            {
                return Err(FilesError::PartOrder {
                    part_id: pid.clone(),
                });
            }
            let size = p.bytes.max(0) as u64;
            if i + 1 < part_ids.len() && size < S3_MIN_PART {
                return Err(FilesError::PartTooSmall {
                    part_id: pid.clone(),
                    size,
                    min: S3_MIN_PART,
                });
            }
            total += size;
            parts.push(PartInfo {
                number: p.number as i32,
                etag: p.etag.clone(),
                size,
            });
        }
        if total != up.bytes as u64 {
            return Err(FilesError::ByteCountMismatch {
                declared: up.bytes as u64,
                actual: total,
            });
        }
        if !self
            .inner
            .db
            .set_upload_status(upload_id, &["pending"], "completing")
            .await?
        {
            // Another request completed, cancelled or is completing it meanwhile.
            self.pending_upload(upload_id).await?;
            return Err(FilesError::UploadState {
                id: upload_id.to_string(),
                status: "being completed",
            });
        }
        let store = &self.inner.store;
        if let Err(e) = store
            .complete_multipart(&up.object_key, &up.multipart_id, &parts)
            .await
        {
            let _ = self
                .inner
                .db
                .set_upload_status(upload_id, &["completing"], "pending")
                .await;
            return Err(FilesError::store("CompleteMultipartUpload", e));
        }
        // Read the object back once: its sha256 for the row, and the md5 check.
        let verified = self.read_back(&up.object_key).await;
        let (size, sha256, actual_md5) = match verified {
            Ok(v) => v,
            Err(e) => {
                self.give_up_upload(&up, "pending").await;
                return Err(e);
            }
        };
        if size != up.bytes as u64 {
            self.give_up_upload(&up, "cancelled").await;
            return Err(FilesError::ByteCountMismatch {
                declared: up.bytes as u64,
                actual: size,
            });
        }
        if let Some(expected) = md5 {
            if expected != actual_md5 {
                self.give_up_upload(&up, "cancelled").await;
                return Err(FilesError::Md5Mismatch {
                    expected,
                    actual: actual_md5,
                });
            }
        }
        let row = FileRow {
            id: up.file_id.clone(),
            filename: up.filename.clone(),
            purpose: up.purpose,
            bytes: size as i64,
            created_at: up.created_at,
            expires_at: expires_at(
                up.created_at,
                up.purpose,
                up.file_expires_after
                    .map(|seconds| crate::ExpiresAfter {
                        anchor: "created_at".into(),
                        seconds,
                    })
                    .as_ref(),
            ),
            sha256: Some(sha256),
            object_key: up.object_key.clone(),
        };
        if let Err(e) = self.inner.db.complete_upload(upload_id, &row).await {
            self.give_up_upload(&up, "cancelled").await;
            return Err(e);
        }
        let mut done = up.clone();
        done.status = "completed".into();
        done.to_object(self.now(), Some(row.to_object()))
    }

    /// After S3 completed but the file cannot be kept: delete the object, mark the upload.
    async fn give_up_upload(&self, up: &UploadRow, status: &str) {
        if let Err(e) = self.inner.store.delete(&up.object_key).await {
            tracing::warn!(key = up.object_key, error = %e, "deleting an assembled upload failed; the sweeper removes it");
        }
        // After S3 completed, the multipart upload is gone: "pending" cannot be resumed.
        let status = if status == "pending" {
            "cancelled"
        } else {
            status
        };
        let _ = self
            .inner
            .db
            .set_upload_status(&up.id, &["completing"], status)
            .await;
        let _ = self.inner.db.delete_parts(&up.id).await;
    }

    async fn read_back(&self, key: &str) -> Result<(u64, String, String)> {
        let resp = self
            .inner
            .store
            .get(key, &GetOptions::default())
            .await
            .map_err(|e| FilesError::store("GetObject", e))?;
        let mut body = resp.body;
        let mut sha = Sha256::new();
        let mut md5 = Md5::new();
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| FilesError::store("GetObject body", e))?;
            n += chunk.len() as u64;
            sha.update(&chunk);
            md5.update(&chunk);
        }
        Ok((n, hex::encode(sha.finalize()), hex::encode(md5.finalize())))
    }

    /// Cancels a pending upload: aborts the multipart upload, forgets the parts.
    #[tracing::instrument(skip_all, fields(upload = ?upload_id))]
    pub async fn cancel_upload(&self, upload_id: &str) -> Result<UploadObject> {
        let up = self.pending_upload(upload_id).await?;
        if !self
            .inner
            .db
            .set_upload_status(upload_id, &["pending"], "cancelled")
            .await?
        {
            self.pending_upload(upload_id).await?;
            return Err(FilesError::UploadState {
                id: upload_id.to_string(),
                status: "being completed",
            });
        }
        if let Err(e) = self
            .inner
            .store
            .abort_multipart(&up.object_key, &up.multipart_id)
            .await
        {
            tracing::warn!(upload_id, error = %e, "aborting the multipart upload failed");
        }
        self.inner.db.delete_parts(upload_id).await?;
        let mut done = up;
        done.status = "cancelled".into();
        done.to_object(self.now(), None)
    }
}
