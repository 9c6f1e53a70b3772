//! One error type for every route, one mapping from error kinds to HTTP statuses, one body
//! shape: OpenAI's `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use infra_config::ErrorKind;
use serde::Serialize;

/// Everything a route can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A Files or Uploads API error (carries OpenAI's `param`).
    #[error(transparent)]
    Files(Box<infra_files::FilesError>),
    /// A run could not be prepared or the sandbox failed.
    #[error(transparent)]
    Run(Box<infra_runner::RunError>),
    /// An object-store failure (images, kernel).
    #[error(transparent)]
    Store(Box<infra_store::Error>),
    /// An image-builder failure.
    #[error(transparent)]
    Image(Box<infra_image::Error>),
    /// The API key file cannot be used.
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    /// A field of the request is wrong; `param` names it.
    #[error("{message}")]
    BadRequest {
        /// What is wrong and what to send instead.
        message: String,
        /// The offending parameter.
        param: Option<String>,
    },
    /// The body is over this route's limit.
    #[error("the request body is over this route's size limit; send less (large files go through /v1/uploads)")]
    BodyTooLarge,
    /// Unknown route target (language, image).
    #[error("{0}")]
    NotFound(String),
    /// No or a wrong API key.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Every execution slot and queue place is taken.
    #[error("too many executions in progress ({running} running, {queued} queued); retry after {retry_after} s")]
    Busy {
        /// Executions running.
        running: usize,
        /// Executions waiting.
        queued: usize,
        /// Seconds to wait (`Retry-After`).
        retry_after: u64,
    },
    /// The server is shutting down and takes no new work.
    #[error("the server is shutting down; retry on another instance or after it restarts")]
    ShuttingDown,
    /// A host-side failure outside the core crates (temp files, a task that panicked).
    #[error("{what}: {source}")]
    Internal {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// OpenAI's error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The error inside [`ErrorBody`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// One line: what happened and what to do, cause after it.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`, `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code (`invalid_api_key`, `not_found`, `sandbox_failure`, ...).
    pub code: Option<String>,
}

impl ApiError {
    /// A bad request naming its parameter.
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// The workspace-wide kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Files(e) => e.kind().general(),
            Self::Run(e) => e.kind(),
            Self::Store(e) => e.kind(),
            Self::Image(e) => e.kind(),
            Self::Keys(e) => e.kind(),
            Self::BadRequest { .. } => ErrorKind::Usage,
            Self::BodyTooLarge => ErrorKind::TooLarge,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Unauthorized(_) => ErrorKind::Usage,
            Self::Busy { .. } | Self::ShuttingDown => ErrorKind::Unavailable,
            Self::Internal { .. } => ErrorKind::Failure,
        }
    }

    fn param(&self) -> Option<String> {
        match self {
            Self::Files(e) => match e.kind() {
                infra_files::ErrorKind::InvalidRequest { param } => param,
                infra_files::ErrorKind::NotFound
                | infra_files::ErrorKind::TooLarge
                | infra_files::ErrorKind::Conflict
                | infra_files::ErrorKind::Unavailable
                | infra_files::ErrorKind::Internal => None,
            },
            Self::BadRequest { param, .. } => param.clone(),
            Self::Run(_)
            | Self::BodyTooLarge
            | Self::Store(_)
            | Self::Image(_)
            | Self::Keys(_)
            | Self::NotFound(_)
            | Self::Unauthorized(_)
            | Self::Busy { .. }
            | Self::ShuttingDown
            | Self::Internal { .. } => None,
        }
    }

    /// HTTP status, OpenAI error type and code.
    pub fn status(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
            ),
            Self::Busy { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            Self::Files(_)
            | Self::Run(_)
            | Self::Store(_)
            | Self::Image(_)
            | Self::Keys(_)
            | Self::BadRequest { .. }
            | Self::BodyTooLarge
            | Self::NotFound(_)
            | Self::ShuttingDown
            | Self::Internal { .. } => {
                let k = self.kind();
                (kind_status(k), kind_type(k), k.as_str())
            }
        }
    }

    /// Headers that go with the status.
    fn headers(&self) -> Vec<(header::HeaderName, HeaderValue)> {
        match self {
            Self::Busy { retry_after, .. } => {
                vec![(header::RETRY_AFTER, HeaderValue::from(*retry_after))]
            }
            Self::ShuttingDown => vec![(header::RETRY_AFTER, HeaderValue::from(5u32))],
            Self::Unauthorized(_) => vec![(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"infra.operator\""),
            )],
            Self::Files(_)
            | Self::Run(_)
            | Self::Store(_)
            | Self::Image(_)
            | Self::Keys(_)
            | Self::BadRequest { .. }
            | Self::BodyTooLarge
            | Self::NotFound(_)
            | Self::Internal { .. } => Vec::new(),
        }
    }
}

/// The one place kinds become HTTP statuses.
pub fn kind_status(k: ErrorKind) -> StatusCode {
    match k {
        ErrorKind::Usage => StatusCode::BAD_REQUEST,
        ErrorKind::Refused => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Prerequisite | ErrorKind::Failure => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Sandbox => StatusCode::BAD_GATEWAY,
    }
}

fn kind_type(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::Usage
        | ErrorKind::Refused
        | ErrorKind::NotFound
        | ErrorKind::TooLarge
        | ErrorKind::Conflict => "invalid_request_error",
        ErrorKind::Prerequisite
        | ErrorKind::Unavailable
        | ErrorKind::Sandbox
        | ErrorKind::Failure => "server_error",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, code) = self.status();
        // One line, cause after it (the core errors already read that way).
        let message = self.to_string().replace('\n', " ");
        if status.is_server_error() {
            tracing::error!(%status, error = %message, "request failed");
        } else {
            tracing::debug!(%status, error = %message, "request refused");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                message,
                kind: kind.into(),
                param: self.param(),
                code: Some(code.into()),
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        for (k, v) in self.headers() {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

/// What routes return.
pub type ApiResult<T> = Result<T, ApiError>;

/// `axum::Json` whose rejections (malformed JSON, wrong fields, wrong content type, body over
/// the limit) are [`ApiError`]s in OpenAI's error format rather than axum's plain text.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::BadRequest {
                message: format!("the JSON body does not fit this route: {}", e.body_text()),
                param: None,
            }),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ApiError::BadRequest {
                message: format!("the body is not valid JSON: {}", e.body_text()),
                param: None,
            }),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::BadRequest {
                message: "send the body as JSON with `Content-Type: application/json`".into(),
                param: None,
            }),
            Err(JsonRejection::BytesRejection(e)) => Err(body_error(e.status(), e.body_text())),
            Err(e) => Err(body_error(e.status(), e.body_text())),
        }
    }
}

/// A body that could not be read: over the limit (413) or cut off (400).
pub fn body_error(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge
    } else {
        ApiError::BadRequest {
            message: format!("the request body could not be read: {text}"),
            param: None,
        }
    }
}

impl From<infra_files::FilesError> for ApiError {
    fn from(e: infra_files::FilesError) -> Self {
        Self::Files(Box::new(e))
    }
}

impl From<infra_runner::RunError> for ApiError {
    fn from(e: infra_runner::RunError) -> Self {
        Self::Run(Box::new(e))
    }
}

impl From<infra_store::Error> for ApiError {
    fn from(e: infra_store::Error) -> Self {
        Self::Store(Box::new(e))
    }
}

impl From<infra_image::Error> for ApiError {
    fn from(e: infra_image::Error) -> Self {
        Self::Image(Box::new(e))
    }
}
