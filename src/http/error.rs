//! The one mapping from the application's error to HTTP, in the shapes the
//! original FastAPI bucket's clients already parse.
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::Error;

/// FastAPI's 422 body: every violated field, each named by where it is.
#[derive(Debug, Serialize, ToSchema)]
#[allow(clippy::upper_case_acronyms)]
pub struct HTTPValidationError {
    pub detail: Vec<ValidationError>,
}

/// One violated field.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidationError {
    /// Where: `body`, `query` or `path`, then the field's name (and, in a
    /// JSON array, the item's index), e.g. `["body", "focus_score"]`.
    pub loc: Vec<Loc>,
    pub msg: String,
    /// `value_error`; in an array item also `not_found` or `storage_error`.
    #[serde(rename = "type")]
    pub kind: String,
}

impl ValidationError {
    /// `field` as `a.b.c` (a violation's name), each part a step of `loc`.
    pub fn at(prefix: Vec<Loc>, field: &str, msg: impl Into<String>, kind: &str) -> Self {
        let mut loc = prefix;
        loc.extend(
            field
                .split('.')
                .filter(|f| !f.is_empty())
                .map(|f| Loc::Name(f.to_owned())),
        );
        ValidationError {
            loc,
            msg: msg.into(),
            kind: kind.to_owned(),
        }
    }
}

/// A step of `loc`: a field's name or an array item's index.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Loc {
    Name(String),
    Index(usize),
}

/// FastAPI's shape for every other error: `{"detail": "..."}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorMessage {
    pub detail: String,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        match self {
            Error::InvalidInput(violations) => {
                // FastAPI's 422: {"detail": [{"loc": [...], "msg": ..., "type": ...}]}.
                let detail = violations
                    .into_iter()
                    .map(|v| {
                        ValidationError::at(Vec::new(), &v.field, v.description, "value_error")
                    })
                    .collect();
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Json(HTTPValidationError { detail }),
                )
                    .into_response()
            }
            Error::NotFound(what) => detail(StatusCode::NOT_FOUND, format!("{what} not found")),
            Error::FailedPrecondition(why) => detail(StatusCode::CONFLICT, why),
            Error::Unavailable(why) => detail(StatusCode::SERVICE_UNAVAILABLE, why),
            Error::Unauthenticated(why) => {
                let mut response = detail(StatusCode::UNAUTHORIZED, why);
                response.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
                response
            }
            Error::PermissionDenied(why) => detail(StatusCode::FORBIDDEN, why),
            Error::ResourceExhausted {
                message,
                retry_after,
            } => {
                let mut response = detail(StatusCode::TOO_MANY_REQUESTS, message);
                if let Some(after) = retry_after {
                    // Whole seconds, rounded up: never earlier than allowed.
                    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
                    response.headers_mut().insert(
                        axum::http::header::RETRY_AFTER,
                        axum::http::HeaderValue::from(secs.max(1)),
                    );
                }
                response
            }
            Error::Internal(why) => {
                tracing::error!(error = %why, "internal error");
                detail(StatusCode::INTERNAL_SERVER_ERROR, why)
            }
        }
    }
}

/// `{"detail": "..."}`, FastAPI's shape for every other error.
pub fn detail(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ErrorMessage {
        detail: message.into(),
    };
    (status, Json(body)).into_response()
}
