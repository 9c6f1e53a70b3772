//! Streaming a request body into the store with bounded memory: one `put` below the threshold,
//! else a multipart upload of fixed-size parts; sha256 computed on the way; the size limit
//! enforced while reading; any failure aborts the multipart upload so nothing is left.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use infra_store::{Body, Metadata, ObjectStore, PartInfo};
use sha2::{Digest, Sha256};

use crate::error::{FilesError, Result};

const MIB: u64 = 1024 * 1024;
/// Bodies smaller than this go up in one `put`.
pub const SINGLE_PUT_THRESHOLD: u64 = 8 * MIB;
/// Smallest multipart part `create` uses.
pub const MIN_PART: u64 = 8 * MIB;
/// Largest multipart part `create` uses.
pub const MAX_PART: u64 = 16 * MIB;
/// S3's minimum size of every part but the last.
pub const S3_MIN_PART: u64 = 5 * MIB;
/// Largest part of the Uploads API (OpenAI: 64 MB).
pub const MAX_UPLOAD_PART: u64 = 64 * MIB;
/// S3's largest part number.
pub const MAX_PARTS: i64 = 10_000;

/// Part size for files up to `max_file_size`: 8 MiB, more only when 10000 parts of 8 MiB
/// would not reach the limit (at most 16 MiB; the config refuses larger limits).
pub fn part_size_for(max_file_size: u64) -> u64 {
    max_file_size
        .div_ceil(MAX_PARTS as u64)
        .clamp(MIN_PART, MAX_PART)
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    pub size: u64,
    pub sha256: String,
}

/// Streams `body` to `key`. On any error nothing is left under `key` (the multipart upload is
/// aborted; a single `put` happens only once the whole body was read).
pub async fn write_object<S>(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    mut body: S,
    max: u64,
    part_size: u64,
) -> Result<Written>
where
    S: Stream<Item = std::result::Result<Bytes, std::io::Error>> + Send + Unpin,
{
    let mut hasher = Sha256::new();
    let mut buf = BytesMut::new();
    let mut total: u64 = 0;
    let mut multipart: Option<(String, Vec<PartInfo>)> = None;
    // Parts being sent while the next one is read from the client (at most
    // PARTS_IN_FLIGHT, each `part_size` bytes): receiving and sending overlap.
    let mut inflight: VecDeque<tokio::task::JoinHandle<Result<PartInfo>>> = VecDeque::new();
    let mut next_number: i32 = 1;
    let threshold = SINGLE_PUT_THRESHOLD.min(part_size);

    let result: Result<()> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| FilesError::BodyRead {
                param: "file",
                received: total,
                source,
            })?;
            total += chunk.len() as u64;
            if total > max {
                return Err(FilesError::TooLarge {
                    what: "file",
                    limit: max,
                    got: None,
                });
            }
            hasher.update(&chunk);
            buf.extend_from_slice(&chunk);
            while buf.len() as u64 >= part_size.max(threshold) {
                let part = buf.split_to(part_size as usize).freeze();
                if multipart.is_none() {
                    let id = store
                        .create_multipart(key, &Metadata::new())
                        .await
                        .map_err(|e| FilesError::store("CreateMultipartUpload", e))?;
                    multipart = Some((id, Vec::new()));
                }
                if let Some((id, parts)) = &mut multipart {
                    if inflight.len() >= PARTS_IN_FLIGHT {
                        if let Some(h) = inflight.pop_front() {
                            parts.push(joined(key, h).await?);
                        }
                    }
                    inflight.push_back(spawn_part(store, key, id, next_number, part));
                    next_number += 1;
                }
            }
        }
        if let Some((_, parts)) = &mut multipart {
            while let Some(h) = inflight.pop_front() {
                parts.push(joined(key, h).await?);
            }
        }
        Ok(())
    }
    .await;
    // A failure leaves no part upload running behind the abort.
    for h in inflight.drain(..) {
        h.abort();
        let _ = h.await;
    }

    let sha256 = hex::encode(hasher.finalize());
    match (result, multipart) {
        (Ok(()), None) => {
            let mut meta = Metadata::new();
            meta.insert(infra_store::META_SHA256.into(), sha256.clone());
            store
                .put(key, Body::Bytes(buf.freeze()), &meta)
                .await
                .map_err(|e| FilesError::store("PutObject", e))?;
        }
        (Ok(()), Some((id, mut parts))) => {
            let r: Result<()> = async {
                if !buf.is_empty() {
                    let number = parts.len() as i32 + 1;
                    let p = store
                        .upload_part(key, &id, number, Body::Bytes(buf.freeze()))
                        .await
                        .map_err(|e| FilesError::store("UploadPart", e))?;
                    parts.push(p);
                }
                store
                    .complete_multipart(key, &id, &parts)
                    .await
                    .map_err(|e| FilesError::store("CompleteMultipartUpload", e))?;
                Ok(())
            }
            .await;
            if let Err(e) = r {
                abort(store, key, &id).await;
                // A completion that failed late may still have written the object.
                let _ = store.delete(key).await;
                return Err(e);
            }
        }
        (Err(e), mp) => {
            if let Some((id, _)) = mp {
                abort(store, key, &id).await;
            }
            return Err(e);
        }
    }
    Ok(Written {
        size: total,
        sha256,
    })
}

/// Parts of one file sent to the store at once while the next is read.
const PARTS_IN_FLIGHT: usize = 2;

fn spawn_part(
    store: &Arc<dyn ObjectStore>,
    key: &str,
    id: &str,
    number: i32,
    part: Bytes,
) -> tokio::task::JoinHandle<Result<PartInfo>> {
    let (store, key, id) = (Arc::clone(store), key.to_string(), id.to_string());
    tokio::spawn(async move {
        store
            .upload_part(&key, &id, number, Body::Bytes(part))
            .await
            .map_err(|e| FilesError::store("UploadPart", e))
    })
}

/// The part task's result; a task that panicked is a failed part.
async fn joined(key: &str, h: tokio::task::JoinHandle<Result<PartInfo>>) -> Result<PartInfo> {
    h.await.map_err(|e| {
        FilesError::store(
            "UploadPart",
            infra_store::Error::Io {
                op: "send a part of",
                path: key.into(),
                source: std::io::Error::other(e.to_string()),
            },
        )
    })?
}

async fn abort(store: &Arc<dyn ObjectStore>, key: &str, id: &str) {
    if let Err(e) = store.abort_multipart(key, id).await {
        tracing::warn!(key, error = %e, "aborting a multipart upload failed; the bucket's lifecycle rule or the sweeper cleans it");
    }
}

/// Copies one Uploads API part into a temp file in `dir` (bounded memory for parts up to
/// 64 MiB), refusing more than `max` bytes. Returns the file and its size.
pub async fn spool<S>(dir: &Path, mut body: S, max: u64) -> Result<(tempfile::NamedTempFile, u64)>
where
    S: Stream<Item = std::result::Result<Bytes, std::io::Error>> + Send + Unpin,
{
    let dir = dir.to_path_buf();
    let d2 = dir.clone();
    let file = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&d2)?;
        tempfile::Builder::new().prefix("part-").tempfile_in(&d2)
    })
    .await
    .map_err(|e| FilesError::io(&dir, std::io::Error::other(e)))?
    .map_err(|e| FilesError::io(&dir, e))?;
    let std_file = file.reopen().map_err(|e| FilesError::io(file.path(), e))?;
    let mut f = tokio::fs::File::from_std(std_file);
    let mut total = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|source| FilesError::BodyRead {
            param: "data",
            received: total,
            source,
        })?;
        total += chunk.len() as u64;
        if total > max {
            return Err(FilesError::TooLarge {
                what: "part",
                limit: max,
                got: None,
            });
        }
        f.write_all(&chunk)
            .await
            .map_err(|e| FilesError::io(file.path(), e))?;
    }
    f.flush()
        .await
        .map_err(|e| FilesError::io(file.path(), e))?;
    Ok((file, total))
}
