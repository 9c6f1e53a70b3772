//! Route table and the small routes (health, metrics, OpenAPI, languages, images).

pub mod exec;
pub mod files;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_http::timeout::TimeoutLayer;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::AppState;

/// Room for multipart framing around a file or part.
const MULTIPART_SLACK: usize = 1 << 20;

pub(crate) fn routes(state: Arc<AppState>) -> Router {
    let cfg = &state.config.server;
    let json_limit = DefaultBodyLimit::max(cfg.max_json_body);
    let timeout = TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        Duration::from_secs(cfg.request_timeout),
    );
    let file_limit = usize::try_from(state.files.max_file_size())
        .unwrap_or(usize::MAX)
        .saturating_add(MULTIPART_SLACK);
    let part_limit = infra_files::MAX_UPLOAD_PART as usize + MULTIPART_SLACK;
    // Control routes: small JSON, bounded time.
    let control = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/api/v1/languages", get(languages))
        .route("/api/v1/languages/{lang}", get(language))
        .route(
            "/v1/files/{file_id}",
            get(files::get_file).delete(files::delete_file),
        )
        .route("/v1/files", get(files::list_files))
        .route("/v1/uploads", post(files::create_upload))
        .route(
            "/v1/uploads/{upload_id}/complete",
            post(files::complete_upload),
        )
        .route("/v1/uploads/{upload_id}/cancel", post(files::cancel_upload))
        .layer(timeout)
        .layer(json_limit);
    // Runs (bounded by their own timeouts), store transfers, and streamed bodies.
    let long = Router::new()
        .route("/api/v1/execute", post(exec::execute))
        .route("/api/v1/execute/stream", post(exec::execute_stream))
        .route("/api/v1/run", post(exec::run_batch))
        .route("/api/v1/rootfs", get(rootfs_list))
        .route("/api/v1/rootfs/{lang}/upload", post(rootfs_upload))
        .route("/api/v1/rootfs/{lang}/download", post(rootfs_download))
        .route("/v1/files/{file_id}/content", get(files::file_content))
        .layer(json_limit);
    let uploads = Router::new()
        .route("/v1/files", post(files::create_file))
        .layer(DefaultBodyLimit::max(file_limit))
        .merge(
            Router::new()
                .route("/v1/uploads/{upload_id}/parts", post(files::add_part))
                .layer(DefaultBodyLimit::max(part_limit)),
        );
    control
        .merge(long)
        .merge(uploads)
        .fallback(not_found)
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no route {}; see /openapi.json for the routes",
        uri.path()
    ))
}

/// `GET /health` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `healthy`, or `stopping` during shutdown.
    pub status: String,
    /// Server version.
    pub version: String,
    /// Seconds since start.
    pub uptime: f64,
    /// Executions running.
    pub running: usize,
    /// Executions waiting for a slot.
    pub queued: usize,
}

/// Liveness and load; no key needed.
#[utoipa::path(get, path = "/health", tag = "meta",
    responses((status = 200, description = "Healthy", body = Health),
              (status = 503, description = "Stopping", body = Health)))]
pub async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let stopping = *state.stopping.borrow();
    let body = Health {
        status: if stopping { "stopping" } else { "healthy" }.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime: state.started.elapsed().as_secs_f64(),
        running: state.slots.running(),
        queued: state.slots.queued(),
    };
    let code = if stopping {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body))
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text", content_type = "text/plain", body = String),
              (status = 401, description = "Missing or wrong API key", body = ErrorBody)))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    state
        .metrics
        .vms_pooled
        .set(state.pool.ready_total() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// This API's OpenAPI 3.1 document, generated from the code.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI document", body = Object)))]
pub async fn openapi() -> impl IntoResponse {
    Json(crate::openapi::document())
}

/// A language and whether its image is on this host.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LanguageInfo {
    /// Key (`python`).
    pub key: String,
    /// Name (`Python`).
    pub name: String,
    /// Other accepted names.
    pub aliases: Vec<String>,
    /// Source file name in the workspace.
    pub file: String,
    /// Compiled before running.
    pub compiled: bool,
    /// The image is on this host (else the first run fetches or builds it).
    pub image_present: bool,
    /// Image size, bytes, when present.
    pub image_size: Option<u64>,
}

/// `GET /api/v1/languages` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LanguageList {
    /// Sorted by key.
    pub languages: Vec<LanguageInfo>,
}

fn info(state: &AppState, l: &infra_languages::Language) -> LanguageInfo {
    let image = std::fs::metadata(state.paths.image(&l.key)).ok();
    LanguageInfo {
        key: l.key.clone(),
        name: l.name.clone(),
        aliases: l.aliases.clone(),
        file: l.file.clone(),
        compiled: !l.build.is_empty(),
        image_present: image.is_some(),
        image_size: image.map(|m| m.len()),
    }
}

/// Every language of the table.
#[utoipa::path(get, path = "/api/v1/languages", tag = "languages",
    responses((status = 200, description = "Languages", body = LanguageList)))]
pub async fn languages(State(state): State<Arc<AppState>>) -> Json<LanguageList> {
    let languages = infra_languages::LanguageTable::builtin()
        .iter()
        .map(|l| info(&state, l))
        .collect();
    Json(LanguageList { languages })
}

/// One language, by key or alias.
#[utoipa::path(get, path = "/api/v1/languages/{lang}", tag = "languages",
    params(("lang" = String, Path, description = "Key or alias")),
    responses((status = 200, description = "The language", body = LanguageInfo),
              (status = 404, description = "Unknown language", body = ErrorBody)))]
pub async fn language(
    State(state): State<Arc<AppState>>,
    Path(lang): Path<String>,
) -> ApiResult<Json<LanguageInfo>> {
    let l = infra_languages::LanguageTable::builtin()
        .get(&lang)
        .map_err(|e| ApiError::NotFound(e.to_string()))?;
    Ok(Json(info(&state, l)))
}

/// `GET /api/v1/rootfs` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RootfsQuery {
    /// List the object store instead of this host.
    #[serde(default)]
    pub remote: bool,
}

/// An image on this host or in the store.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RootfsEntry {
    /// Language (image name).
    pub language: String,
    /// Local path (local listing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Object key (remote listing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Bytes.
    pub size: u64,
    /// RFC 3339 (remote listing).
    #[serde(rename = "lastModified", skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
}

/// `GET /api/v1/rootfs` answer (the original's shape).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RootfsList {
    /// The images.
    pub rootfs: Vec<RootfsEntry>,
    /// `local` or `s3` (the configured store).
    pub source: String,
}

async fn store_engine(state: &AppState) -> ApiResult<infra_store::Engine> {
    let config =
        infra_store::StoreConfig::from_env(&infra_store::StoreFlags::default(), &state.paths)?;
    Ok(config.engine(Arc::new(infra_store::NoProgress)).await?)
}

/// Images on this host, or with `remote=true` in the object store.
#[utoipa::path(get, path = "/api/v1/rootfs", tag = "images", params(RootfsQuery),
    responses((status = 200, description = "Images", body = RootfsList),
              (status = 500, description = "Store not usable", body = ErrorBody)))]
pub async fn rootfs_list(
    State(state): State<Arc<AppState>>,
    Query(q): Query<RootfsQuery>,
) -> ApiResult<Json<RootfsList>> {
    if q.remote {
        let engine = store_engine(&state).await?;
        let objects = engine.store().list("").await?;
        let rootfs = infra_store::artifacts::remote_images(&objects)
            .into_iter()
            .map(|i| RootfsEntry {
                language: i.language,
                path: None,
                key: Some(i.key),
                size: i.size,
                last_modified: i.last_modified.map(|t| t.to_rfc3339()),
            })
            .collect();
        return Ok(Json(RootfsList {
            rootfs,
            source: "s3".into(),
        }));
    }
    let mut rootfs = Vec::new();
    for (path, name) in infra_store::artifacts::local_images(&state.paths)? {
        let Some(lang) = name
            .strip_prefix("rootfs-")
            .and_then(|n| n.strip_suffix(".ext4"))
        else {
            continue;
        };
        rootfs.push(RootfsEntry {
            language: lang.to_string(),
            size: std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0),
            path: Some(path.display().to_string()),
            key: None,
            last_modified: None,
        });
    }
    Ok(Json(RootfsList {
        rootfs,
        source: "local".into(),
    }))
}

/// Answer of an image transfer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TransferResult {
    /// `rootfs uploaded` or `rootfs downloaded`.
    pub message: String,
    /// Where it went (upload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3_path: Option<String>,
    /// Where it went (download).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_path: Option<String>,
    /// sha256 of the image.
    pub sha256: String,
    /// Bytes.
    pub size: u64,
    /// Seconds.
    pub seconds: f64,
}

/// Uploads this host's image of `lang` to the object store (verified, atomic).
#[utoipa::path(post, path = "/api/v1/rootfs/{lang}/upload", tag = "images",
    params(("lang" = String, Path, description = "Image name")),
    responses((status = 200, description = "Uploaded", body = TransferResult),
              (status = 400, description = "Bad name", body = ErrorBody),
              (status = 404, description = "No such image on this host", body = ErrorBody)))]
pub async fn rootfs_upload(
    State(state): State<Arc<AppState>>,
    Path(lang): Path<String>,
) -> ApiResult<Json<TransferResult>> {
    let started = std::time::Instant::now();
    let engine = store_engine(&state).await?;
    let done = infra_store::artifacts::upload_image(&engine, &state.paths, &lang, false).await?;
    let first = done
        .first()
        .ok_or_else(|| ApiError::NotFound(lang.clone()))?;
    Ok(Json(TransferResult {
        message: "rootfs uploaded".into(),
        s3_path: Some(first.url.clone()),
        local_path: None,
        sha256: first.sha256.clone(),
        size: first.size,
        seconds: started.elapsed().as_secs_f64(),
    }))
}

/// Downloads `lang`'s image from the object store to this host (sha256-verified, atomic).
#[utoipa::path(post, path = "/api/v1/rootfs/{lang}/download", tag = "images",
    params(("lang" = String, Path, description = "Image name")),
    responses((status = 200, description = "Downloaded", body = TransferResult),
              (status = 404, description = "Not in the store", body = ErrorBody),
              (status = 422, description = "Checksum mismatch", body = ErrorBody)))]
pub async fn rootfs_download(
    State(state): State<Arc<AppState>>,
    Path(lang): Path<String>,
) -> ApiResult<Json<TransferResult>> {
    let started = std::time::Instant::now();
    let engine = store_engine(&state).await?;
    let done =
        infra_store::artifacts::download_image(&engine, &state.paths, &lang, None, None).await?;
    let first = done
        .first()
        .ok_or_else(|| ApiError::NotFound(lang.clone()))?;
    Ok(Json(TransferResult {
        message: "rootfs downloaded".into(),
        s3_path: None,
        local_path: Some(first.path.display().to_string()),
        sha256: first.sha256.clone(),
        size: first.size,
        seconds: started.elapsed().as_secs_f64(),
    }))
}
