//! OpenAI's Files API (`/v1/files`) and Uploads API (`/v1/uploads`) over `infra_files`.
//! Bodies are streamed into the store, never held whole in memory.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::TryStreamExt;
use infra_files::{
    ByteRange, DeletedFile, ExpiresAfter, FileList, FileObject, ListQuery, NewFile, NewUpload,
    Order, Purpose, UploadObject, UploadPart,
};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiJson, ApiResult, ErrorBody};
use crate::AppState;

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge
    } else {
        ApiError::bad(
            "file",
            format!("the multipart body is malformed: {}", e.body_text()),
        )
    }
}

fn multipart_rejection(e: axum::extract::multipart::MultipartRejection) -> ApiError {
    ApiError::bad(
        "file",
        format!("send a multipart/form-data body: {}", e.body_text()),
    )
}

fn io_stream(
    field: axum::extract::multipart::Field<'_>,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + '_ {
    field.map_err(|e| std::io::Error::other(e.body_text()))
}

/// The multipart form of `POST /v1/files` (documentation).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CreateFileForm {
    /// The file (its filename is kept).
    #[schema(format = Binary, value_type = String)]
    file: Vec<u8>,
    /// `assistants`, `batch`, `fine-tune`, `vision`, `user_data`, `evals`.
    purpose: String,
    /// `created_at` (the only anchor).
    #[schema(rename = "expires_after[anchor]")]
    expires_after_anchor: Option<String>,
    /// 3600 to 2592000.
    #[schema(rename = "expires_after[seconds]")]
    expires_after_seconds: Option<i64>,
}

/// Uploads a file (multipart: `file`, `purpose`, optional `expires_after[anchor]` and
/// `expires_after[seconds]`). Send the form fields before the file part; a file sent first is
/// spooled to disk until the purpose is known.
#[utoipa::path(post, path = "/v1/files", tag = "files",
    request_body(content = CreateFileForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The file", body = FileObject),
        (status = 400, description = "Bad request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "File too large", body = ErrorBody),
        (status = 503, description = "Store or database unavailable", body = ErrorBody),
    ))]
pub async fn create_file(
    State(state): State<Arc<AppState>>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ApiResult<Json<FileObject>> {
    let mut form = form.map_err(multipart_rejection)?;
    let mut purpose: Option<Purpose> = None;
    let mut anchor: Option<String> = None;
    let mut seconds: Option<i64> = None;
    let mut created: Option<FileObject> = None;
    let mut spooled: Option<(String, tempfile::NamedTempFile)> = None;
    let expires = |anchor: &Option<String>, seconds: Option<i64>| -> ApiResult<_> {
        match (anchor, seconds) {
            (None, None) => Ok(None),
            (a, Some(s)) => Ok(Some(ExpiresAfter {
                anchor: a.clone().unwrap_or_else(|| "created_at".into()),
                seconds: s,
            })),
            (Some(_), None) => Err(ApiError::bad(
                "expires_after",
                "expires_after[seconds] is required with expires_after[anchor]",
            )),
        }
    };
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "purpose" => {
                let t = field.text().await.map_err(multipart_error)?;
                purpose = Some(t.parse()?);
            }
            "expires_after[anchor]" => {
                anchor = Some(field.text().await.map_err(multipart_error)?);
            }
            "expires_after[seconds]" => {
                let t = field.text().await.map_err(multipart_error)?;
                seconds = Some(t.trim().parse().map_err(|_| {
                    ApiError::bad(
                        "expires_after",
                        format!("expires_after[seconds] must be an integer, got {t:?}"),
                    )
                })?);
            }
            "file" => {
                if created.is_some() || spooled.is_some() {
                    return Err(ApiError::bad("file", "send exactly one file part"));
                }
                let filename = field.file_name().map(str::to_string).ok_or_else(|| {
                    ApiError::bad("file", "the file part has no filename")
                })?;
                match purpose {
                    Some(p) => {
                        let req = NewFile {
                            filename,
                            purpose: p,
                            expires_after: expires(&anchor, seconds)?,
                        };
                        let body = Box::pin(io_stream(field));
                        created = Some(state.files.create(req, body).await?);
                    }
                    None => {
                        spooled = Some((filename, spool(&state, field).await?));
                    }
                }
            }
            other => {
                return Err(ApiError::bad(
                    other,
                    format!("unknown form field {other:?}; expected file, purpose, expires_after[anchor], expires_after[seconds]"),
                ))
            }
        }
    }
    let Some(purpose) = purpose else {
        return Err(ApiError::bad("purpose", "the purpose field is required"));
    };
    if let Some(f) = created {
        let wanted = expires(&anchor, seconds)?;
        let had = f.expires_at.map(|e| e - f.created_at);
        if wanted.as_ref().map(|w| w.seconds) != had && wanted.is_some() {
            let _ = state.files.delete(&f.id).await;
            return Err(ApiError::bad(
                "expires_after",
                "send expires_after before the file part",
            ));
        }
        return Ok(Json(f));
    }
    let Some((filename, tmp)) = spooled else {
        return Err(ApiError::bad("file", "the file part is required"));
    };
    let req = NewFile {
        filename,
        purpose,
        expires_after: expires(&anchor, seconds)?,
    };
    let file = tokio::fs::File::open(tmp.path())
        .await
        .map_err(|source| ApiError::Internal {
            what: "cannot reopen the spooled upload",
            source,
        })?;
    let body = tokio_util::io::ReaderStream::with_capacity(file, 64 << 10);
    Ok(Json(state.files.create(req, body).await?))
}

/// Writes a multipart field to a temp file under the cache, up to the file size limit.
async fn spool(
    state: &AppState,
    mut field: axum::extract::multipart::Field<'_>,
) -> ApiResult<tempfile::NamedTempFile> {
    let dir = state.paths.cache.join("api-spool");
    infra_config::ensure_dir(&dir, infra_config::PRIVATE_DIR).map_err(|e| ApiError::Internal {
        what: "cannot prepare the spool directory",
        source: std::io::Error::other(e.to_string()),
    })?;
    let internal = |source| ApiError::Internal {
        what: "cannot spool the upload",
        source,
    };
    let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(internal)?;
    let mut out = tokio::fs::File::from_std(tmp.reopen().map_err(internal)?);
    let limit = state.files.max_file_size();
    let mut total = 0u64;
    while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
        total += chunk.len() as u64;
        if total > limit {
            return Err(infra_files::FilesError::TooLarge {
                what: "file",
                limit,
                got: None,
            }
            .into());
        }
        out.write_all(&chunk).await.map_err(internal)?;
    }
    out.flush().await.map_err(internal)?;
    Ok(tmp)
}

/// `GET /v1/files` query (documentation; the route reads the query itself to name the
/// offending parameter in errors).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[allow(dead_code)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Cursor: the `last_id` of the previous page.
    pub after: Option<String>,
    /// 1 to 10000 (default 10000).
    pub limit: Option<String>,
    /// `asc` or `desc` (default) by creation time.
    pub order: Option<String>,
    /// Only files with this purpose.
    pub purpose: Option<String>,
}

/// Lists files, newest first by default; pages with `after` are exact under concurrent
/// inserts and deletes (keyset pagination).
#[utoipa::path(get, path = "/v1/files", tag = "files", params(ListParams),
    responses(
        (status = 200, description = "A page of files", body = FileList),
        (status = 400, description = "Bad request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
    ))]
pub async fn list_files(
    State(state): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<FileList>> {
    for k in q.keys() {
        if !["after", "limit", "order", "purpose"].contains(&k.as_str()) {
            return Err(ApiError::bad(
                k,
                format!("unknown query parameter {k:?}; expected after, limit, order, purpose"),
            ));
        }
    }
    let limit = match q.get("limit") {
        None => None,
        Some(l) => Some(l.parse::<i64>().map_err(|_| {
            ApiError::bad(
                "limit",
                format!("limit must be an integer from 1 to 10000, got {l:?}"),
            )
        })?),
    };
    let query = ListQuery {
        after: q.get("after").cloned(),
        limit,
        order: match q.get("order") {
            Some(o) => o.parse::<Order>()?,
            None => Order::default(),
        },
        purpose: match q.get("purpose") {
            Some(p) => Some(p.parse::<Purpose>()?),
            None => None,
        },
    };
    Ok(Json(state.files.list(&query).await?))
}

/// One file's metadata.
#[utoipa::path(get, path = "/v1/files/{file_id}", tag = "files",
    params(("file_id" = String, Path, description = "`file-…`")),
    responses(
        (status = 200, description = "The file", body = FileObject),
        (status = 404, description = "No such file", body = ErrorBody),
    ))]
pub async fn get_file(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<FileObject>> {
    Ok(Json(state.files.get(&id).await?))
}

/// Deletes a file.
#[utoipa::path(delete, path = "/v1/files/{file_id}", tag = "files",
    params(("file_id" = String, Path, description = "`file-…`")),
    responses(
        (status = 200, description = "Deleted", body = DeletedFile),
        (status = 404, description = "No such file", body = ErrorBody),
    ))]
pub async fn delete_file(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<DeletedFile>> {
    Ok(Json(state.files.delete(&id).await?))
}

/// Parses a `Range` header. Anything but one `bytes=` range is ignored (RFC 9110 lets a
/// server serve the whole file), so a malformed header never fails a download.
fn parse_range(h: &HeaderMap) -> Option<ByteRange> {
    let v = h.get(header::RANGE)?.to_str().ok()?.trim();
    let spec = v.strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return Some(ByteRange::Suffix(b.parse().ok()?));
    }
    let start = a.parse().ok()?;
    let end = if b.is_empty() {
        None
    } else {
        Some(b.parse().ok()?)
    };
    Some(ByteRange::new(start, end))
}

/// `Content-Disposition` for a stored filename (checked at upload: no separators or control
/// characters); quotes and backslashes are escaped, non-ASCII names also go in `filename*`.
fn disposition(name: &str) -> HeaderValue {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut v = format!("attachment; filename=\"{ascii}\"");
    if !name.is_ascii() || name.contains(['"', '\\']) {
        let enc: String = name
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        v.push_str(&format!("; filename*=UTF-8''{enc}"));
    }
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// A file's bytes, streamed; a single `Range: bytes=…` gives 206 (416 when unsatisfiable).
#[utoipa::path(get, path = "/v1/files/{file_id}/content", tag = "files",
    params(("file_id" = String, Path, description = "`file-…`")),
    responses(
        (status = 200, description = "The bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, description = "No such file", body = ErrorBody),
        (status = 416, description = "Range not satisfiable"),
    ))]
pub async fn file_content(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let mut range = parse_range(&headers);
    if let Some(r) = range {
        let meta = state.files.get(&id).await?;
        if meta.bytes == 0 {
            range = None;
        } else if r.resolve(meta.bytes).is_err() {
            let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{}", meta.bytes)).expect("ascii"),
            );
            return Ok(resp);
        }
    }
    let c = state.files.content(&id, range).await?;
    let len = c.range.end - c.range.start;
    let mut resp = Response::new(Body::from_stream(c.body));
    *resp.status_mut() = if c.partial {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_DISPOSITION, disposition(&c.file.filename));
    if let Some(sha) = &c.file.sha256 {
        if let Ok(v) = HeaderValue::from_str(&format!("\"{sha}\"")) {
            h.insert(header::ETAG, v);
        }
    }
    if c.partial {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!(
                "bytes {}-{}/{}",
                c.range.start,
                c.range.end - 1,
                c.file.bytes
            ))
            .expect("ascii"),
        );
    }
    Ok(resp)
}

/// `POST /v1/uploads` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUploadRequest {
    /// Name of the resulting file.
    pub filename: String,
    /// Purpose of the resulting file.
    pub purpose: String,
    /// Exact size of the whole file.
    pub bytes: i64,
    /// MIME type.
    pub mime_type: String,
    /// Expiry of the resulting file.
    #[serde(default)]
    pub expires_after: Option<ExpiresAfter>,
}

/// Starts an upload of a large file in parts (an S3 multipart upload).
#[utoipa::path(post, path = "/v1/uploads", tag = "uploads", request_body = CreateUploadRequest,
    responses(
        (status = 200, description = "The upload", body = UploadObject),
        (status = 400, description = "Bad request", body = ErrorBody),
        (status = 413, description = "Too large", body = ErrorBody),
    ))]
pub async fn create_upload(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CreateUploadRequest>,
) -> ApiResult<Json<UploadObject>> {
    let up = NewUpload {
        filename: req.filename,
        purpose: req.purpose.parse()?,
        bytes: req.bytes,
        mime_type: req.mime_type,
        expires_after: req.expires_after,
    };
    Ok(Json(state.files.create_upload(up).await?))
}

/// The multipart form of a part (documentation).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AddPartForm {
    /// Up to 64 MiB.
    #[schema(format = Binary, value_type = String)]
    data: Vec<u8>,
}

/// Adds a part (multipart field `data`, up to 64 MiB).
#[utoipa::path(post, path = "/v1/uploads/{upload_id}/parts", tag = "uploads",
    params(("upload_id" = String, Path, description = "`upload_…`")),
    request_body(content = AddPartForm, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The part", body = UploadPart),
        (status = 404, description = "No such upload", body = ErrorBody),
        (status = 409, description = "Upload not pending", body = ErrorBody),
        (status = 413, description = "Part too large", body = ErrorBody),
    ))]
pub async fn add_part(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> ApiResult<Json<UploadPart>> {
    let mut form = form.map_err(multipart_rejection)?;
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        if field.name() == Some("data") {
            let body = Box::pin(io_stream(field));
            return Ok(Json(state.files.add_part(&id, body).await?));
        }
    }
    Err(ApiError::bad("data", "the data part is required"))
}

/// `POST /v1/uploads/{id}/complete` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteUploadRequest {
    /// Part ids, in the order they were added.
    pub part_ids: Vec<String>,
    /// Optional hex md5 of the whole file, verified.
    #[serde(default)]
    pub md5: Option<String>,
}

/// Completes an upload: the parts become one file.
#[utoipa::path(post, path = "/v1/uploads/{upload_id}/complete", tag = "uploads",
    params(("upload_id" = String, Path, description = "`upload_…`")),
    request_body = CompleteUploadRequest,
    responses(
        (status = 200, description = "The completed upload with its file", body = UploadObject),
        (status = 400, description = "Bad parts, size or md5", body = ErrorBody),
        (status = 404, description = "No such upload", body = ErrorBody),
        (status = 409, description = "Upload not pending", body = ErrorBody),
    ))]
pub async fn complete_upload(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CompleteUploadRequest>,
) -> ApiResult<Json<UploadObject>> {
    Ok(Json(
        state
            .files
            .complete_upload(&id, &req.part_ids, req.md5.as_deref())
            .await?,
    ))
}

/// Cancels an upload; its parts are discarded.
#[utoipa::path(post, path = "/v1/uploads/{upload_id}/cancel", tag = "uploads",
    params(("upload_id" = String, Path, description = "`upload_…`")),
    responses(
        (status = 200, description = "The cancelled upload", body = UploadObject),
        (status = 404, description = "No such upload", body = ErrorBody),
        (status = 409, description = "Upload not pending", body = ErrorBody),
    ))]
pub async fn cancel_upload(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<UploadObject>> {
    Ok(Json(state.files.cancel_upload(&id).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
            parse_range(&m)
        };
        assert_eq!(h("bytes=0-9"), Some(ByteRange::new(0, Some(9))));
        assert_eq!(h("bytes=5-"), Some(ByteRange::new(5, None)));
        assert_eq!(h("bytes=-3"), Some(ByteRange::Suffix(3)));
        assert_eq!(h("bytes=0-1,4-5"), None, "multiple ranges: whole file");
        assert_eq!(h("items=0-1"), None);
        assert_eq!(h("bytes=x-1"), None);
    }

    #[test]
    fn disposition_escapes() {
        assert_eq!(disposition("a.txt"), "attachment; filename=\"a.txt\"");
        let v = disposition("a\"b.txt");
        assert!(v
            .to_str()
            .unwrap()
            .starts_with("attachment; filename=\"a_b.txt\"; filename*=UTF-8''a%22b.txt"));
        let v = disposition("résumé.pdf");
        assert!(v
            .to_str()
            .unwrap()
            .contains("filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"));
    }
}
