//! Service-level errors: what went wrong, grouped by who is at fault. The HTTP layer maps them to
//! status codes (`http.rs`); storage errors never leak their detail to clients.

use crate::store::StoreError;

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
        Self::Internal(e.to_string())
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;
