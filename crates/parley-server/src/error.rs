//! Service-level errors: what went wrong, grouped by who is at fault, and [`ApiError`], the one
//! place they become HTTP statuses and JSON bodies (for both edges, `http` and `federation`);
//! storage errors never leak their detail to clients.

use crate::store::StoreError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use parley_proto::api::ErrorBody;

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The request is malformed or violates a documented rule (400).
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    /// No valid credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but not allowed (403).
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    /// The thing named does not exist, or is not visible to the caller (404).
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    /// The request conflicts with current state (409); `retryable` says whether syncing and
    /// retrying can succeed (e.g. a commit for a stale epoch).
    #[error("{message}")]
    Conflict {
        code: &'static str,
        message: String,
        retryable: bool,
    },
    /// Over a size limit (413).
    #[error("{message}")]
    TooLarge { code: &'static str, message: String },
    /// Over a rate limit (429).
    #[error("{0}")]
    RateLimited(String),
    /// A MIMI request whose `Host` is not a domain hosted here (421).
    #[error("{0}")]
    Misdirected(String),
    /// Another provider this request depends on (a room's hub, a user's provider) cannot be
    /// reached or failed (503); retrying later can succeed.
    #[error("{message}")]
    Unavailable { code: &'static str, message: String },
    /// A fault on our side (500); the detail goes to the log only.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::Forbidden {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::NotFound {
            code,
            message: message.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::Conflict {
            code,
            message: message.into(),
            retryable: false,
        }
    }

    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::TooLarge {
            code,
            message: message.into(),
        }
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::Unavailable {
            code,
            message: message.into(),
        }
    }

    pub fn wrong_epoch(room_epoch: u64, got: u64) -> Self {
        Self::Conflict {
            code: "wrong_epoch",
            message: format!(
                "the room is at epoch {room_epoch} but this was built for epoch {got}: sync and retry"
            ),
            retryable: true,
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Refused(message) => Self::forbidden("refused", message),
            e => Self::Internal(e.to_string()),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

/// A service error on its way out: status + JSON body. Internal detail goes to the log only.
pub struct ApiError(pub ServiceError);

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        Self(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self(e.into())
    }
}

/// A JSON error body with `status`.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: String,
    retryable: bool,
) -> Response {
    let body = ErrorBody {
        error: code.to_owned(),
        message,
        retryable,
    };
    (status, Json(body)).into_response()
}

impl ApiError {
    /// The status and JSON body this error answers with, over HTTP or in a WebSocket
    /// `refused` frame. Internal detail goes to the log only.
    pub fn status_and_body(self) -> (StatusCode, ErrorBody) {
        let message = self.0.to_string();
        let (status, code, retryable) = match self.0 {
            ServiceError::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code, false),
            ServiceError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", false),
            ServiceError::Forbidden { code, .. } => (StatusCode::FORBIDDEN, code, false),
            ServiceError::NotFound { code, .. } => (StatusCode::NOT_FOUND, code, false),
            ServiceError::Conflict {
                code, retryable, ..
            } => (StatusCode::CONFLICT, code, retryable),
            ServiceError::TooLarge { code, .. } => (StatusCode::PAYLOAD_TOO_LARGE, code, false),
            ServiceError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited", true),
            ServiceError::Misdirected(_) => (
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected_request",
                false,
            ),
            ServiceError::Unavailable { code, .. } => (StatusCode::SERVICE_UNAVAILABLE, code, true),
            ServiceError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                let body = ErrorBody {
                    error: "internal".into(),
                    message: "internal server error".into(),
                    retryable: true,
                };
                return (StatusCode::INTERNAL_SERVER_ERROR, body);
            }
        };
        let body = ErrorBody {
            error: code.to_owned(),
            message,
            retryable,
        };
        (status, body)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.status_and_body();
        (status, Json(body)).into_response()
    }
}
