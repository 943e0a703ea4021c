//! API errors: every client fault gets its own status and a sentence saying what is wrong;
//! internal faults are logged once and answered with a generic message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::registry::RegistryError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn retry_after(mut self, secs: u32) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::Full(_) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
            }
            RegistryError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "rollcall is shutting down: retry shortly",
            ),
            RegistryError::Unavailable(ref why) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why.clone()).retry_after(1)
            }
            // The server is healthy but its disk is not: 503 (retry), never 500. The sentence
            // is true whatever happens next: the failed batch may have reached the log, and
            // the rewrite that repairs it stores the live set, this request's change included.
            RegistryError::Storage(ref detail) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, storage_message(detail))
                    .retry_after(1)
            }
        }
    }
}

/// What a client is told when the data dir could not be written.
pub fn storage_message(detail: &str) -> String {
    let detail = if detail.is_empty() {
        "disk full or failing?"
    } else {
        detail
    };
    format!(
        "the data dir could not be written ({detail}); this request may or may not be stored: \
         repeat it once the disk is healthy"
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}
